//! The loss window of a failover with the default settings: how much of what the master's container
//! wrote is missing from what the failover restores when the master is killed at an arbitrary moment,
//! against the goal of 60 s (the default `--backup-every`), and how long the service is down.
//!
//! Three `coyote` processes on 127.0.0.1-3 with Docker, the `coyote-test/seq:1` service (it appends
//! a synced sequence number to its volume every 50 ms). The bench samples the master's file every
//! 100 ms to know when each number was written; it kills the master (kill -9) at a moment spread over
//! the snapshot interval, waits for the failover to restore and take over, and reports:
//!
//! - the loss window: from the moment the last restored number was first seen to the kill;
//! - the downtime: from the kill to the first number the new master's container writes.
//!
//! Settings from the environment: `BENCH_TRIALS` (3), `BENCH_FIRST_KILL_SECS` (65: the first kill,
//! after the first periodic snapshot), `BENCH_KILL_STEP_SECS` (20: each later trial kills that much
//! later in its run). `COYOTE_BIN` names the binary (the runner builds it in release).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use coyote_tests::{test_images, wait_until, DockerGuard, Node};

const TIMEOUT: Duration = Duration::from_secs(180);

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn last_number(text: &str) -> Option<u64> {
    text.lines().rev().find_map(|l| l.trim().parse().ok())
}

struct Trial {
    loss: Duration,
    downtime: Duration,
    restored_last: u64,
    written_last: u64,
}

fn trial(n: u64, kill_after: Duration) -> Result<Trial> {
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let service = format!("rpo{}x{n}", std::process::id());
    let mut nodes: Vec<Node> = Vec::new();
    for (i, ip) in ["127.0.0.1", "127.0.0.2", "127.0.0.3"].iter().enumerate() {
        let mut node = Node::on_ip(root.path(), &format!("n{}", i + 1), ip);
        node.containers = true;
        node.flags = vec!["--forward".into(), "userspace".into()];
        if i == 0 {
            node.up()?;
            guard.cluster_ids.push(node.cluster_id()?);
        } else {
            let token = nodes[0].token(&[])?;
            node.join(&token)?;
        }
        nodes.push(node);
    }
    let ids: Vec<u64> = nodes
        .iter()
        .map(|n| -> Result<u64> {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(n.dir.join("node.json"))?)?;
            v["node_id"].as_u64().context("a node id")
        })
        .collect::<Result<_>>()?;
    let created = nodes[0].cli_json(&["service", "create", &service, "--image", "coyote-test/seq:1"])?;
    let master = created["placement"]["master"].as_u64().context("a master")?;
    let failover = created["placement"]["failover"].as_u64().context("a failover")?;
    let m = ids.iter().position(|i| *i == master).context("master")?;
    let f = ids.iter().position(|i| *i == failover).context("failover")?;

    // When each number was first seen in the master's file.
    let seen: Arc<Mutex<BTreeMap<u64, Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (seen, stop) = (seen.clone(), stop.clone());
        let file = nodes[m].dir.join("volumes").join(&service).join("seq");
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(last) = std::fs::read_to_string(&file).ok().as_deref().and_then(last_number) {
                    seen.lock().expect("samples").entry(last).or_insert_with(Instant::now);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    wait_until("the container to write", TIMEOUT, || {
        Ok((!seen.lock().expect("samples").is_empty()).then_some(()))
    })?;
    let started = *seen.lock().expect("samples").values().next().context("a first sample")?;
    std::thread::sleep(kill_after.saturating_sub(started.elapsed()));
    nodes[m].kill9();
    let killed = Instant::now();
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let written_last = *seen.lock().expect("samples").keys().last().context("samples")?;

    let list = wait_until("the failover to restore and take over", TIMEOUT, || {
        let list = nodes[f].cli_json(&["backup", "list", &service])?;
        Ok((list["master"].as_u64() == Some(failover) && !list["restored"].is_null()).then_some(list))
    })?;
    let volume = nodes[f].dir.join("volumes").join(&service).join("seq");
    // What the restored snapshot holds (the live file grows as soon as the container runs).
    let restored_last = match list["restored"]["snapshot"].as_str() {
        Some(snapshot) => {
            let copy = root.path().join("restored");
            let into = copy.display().to_string();
            nodes[f].cli_json(&["backup", "restore", &service, "--snapshot", snapshot, "--into", &into])?;
            last_number(&std::fs::read_to_string(copy.join("seq")).unwrap_or_default()).unwrap_or(0)
        }
        None => 0,
    };
    let downtime = wait_until("the new master's container to write", TIMEOUT, || {
        let text = std::fs::read_to_string(&volume).unwrap_or_default();
        Ok((last_number(&text).unwrap_or(0) > restored_last).then(|| killed.elapsed()))
    })?;
    let seen = seen.lock().expect("samples");
    // The first moment a number at least as high as the restored one was seen: what was written
    // after it is what the failover lost.
    let loss = seen
        .range(restored_last.max(1)..)
        .next()
        .map(|(_, at)| killed.saturating_duration_since(*at))
        .unwrap_or_else(|| killed.saturating_duration_since(started));
    for node in &mut nodes {
        node.kill9();
    }
    guard.clean();
    Ok(Trial { loss, downtime, restored_last, written_last })
}

fn main() -> Result<()> {
    test_images()?;
    let trials = env_u64("BENCH_TRIALS", 3);
    let first = env_u64("BENCH_FIRST_KILL_SECS", 65);
    let step = env_u64("BENCH_KILL_STEP_SECS", 20);
    println!("failover loss window with the default --backup-every (60 s); goal: at most 60 s");
    let mut worst = Duration::ZERO;
    let mut down = Vec::new();
    for n in 0..trials {
        let kill_after = Duration::from_secs(first + n * step);
        let t = trial(n, kill_after)?;
        println!(
            "trial {}: killed {} s into the run; wrote up to {}, restored up to {}: loss window {:.1} s, downtime {:.1} s",
            n + 1,
            kill_after.as_secs(),
            t.written_last,
            t.restored_last,
            t.loss.as_secs_f64(),
            t.downtime.as_secs_f64()
        );
        worst = worst.max(t.loss);
        down.push(t.downtime);
    }
    down.sort();
    println!(
        "worst loss window {:.1} s against the goal of 60 s ({:.2}×); median downtime {:.1} s",
        worst.as_secs_f64(),
        worst.as_secs_f64() / 60.0,
        down.get(down.len() / 2).map(|d| d.as_secs_f64()).unwrap_or(0.0)
    );
    Ok(())
}
