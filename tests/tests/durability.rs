//! kill -9 in the middle of a stream of writes, many times over: after each restart every
//! acknowledged event is still there, at the index it was acknowledged with, in order.
//!
//! Rounds: `COYOTE_DURABILITY_ROUNDS` (default 12).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use coyote_tests::{api_call, Node};

const WRITERS: usize = 4;

#[test]
fn acknowledged_events_survive_kill_9() -> Result<()> {
    let rounds: usize =
        std::env::var("COYOTE_DURABILITY_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(12);
    let root = tempfile::tempdir()?;
    let mut node = Node::new(root.path(), "n1");
    node.up()?;
    // index -> token id of every acknowledged write, over all rounds
    let acknowledged: Arc<Mutex<BTreeMap<u64, String>>> = Arc::default();
    let socket = node.dir.join("coyote.sock");
    let mut total_writes = 0;

    for round in 0..rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                let (stop, acknowledged, socket) = (stop.clone(), acknowledged.clone(), socket.clone());
                std::thread::spawn(move || {
                    let mut n = 0;
                    while !stop.load(Ordering::Relaxed) {
                        match api_call(&socket, "POST", "/v1/tokens", r#"{"ttl_ms":60000,"uses":1}"#) {
                            Ok((200, v)) => {
                                let index = v["index"].as_u64().expect("index");
                                let id = v["id"].as_str().expect("id").to_string();
                                acknowledged.lock().unwrap().insert(index, id);
                                n += 1;
                            }
                            _ => break, // the node died under us: this write was not acknowledged
                        }
                    }
                    n
                })
            })
            .collect();
        // Kill at a different moment each round, while the writers are busy.
        std::thread::sleep(Duration::from_millis(150 + (round as u64 * 137) % 500));
        node.kill9();
        stop.store(true, Ordering::Relaxed);
        let written: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
        total_writes += written;

        node.restart()?;
        let events = node.events()?;
        let by_index: BTreeMap<u64, &serde_json::Value> =
            events.iter().map(|e| (e["index"].as_u64().unwrap(), e)).collect();
        let indexes: Vec<u64> = events.iter().map(|e| e["index"].as_u64().unwrap()).collect();
        if !indexes.windows(2).all(|w| w[0] < w[1]) {
            bail!("round {round}: events out of order: {indexes:?}");
        }
        for (index, id) in acknowledged.lock().unwrap().iter() {
            let Some(e) = by_index.get(index) else {
                bail!("round {round}: acknowledged event {index} (token {id}) is lost after kill -9");
            };
            let summary = e["summary"].as_str().unwrap_or("");
            if e["kind"] != "token_issued" || !summary.contains(id.as_str()) {
                bail!("round {round}: event {index} should issue token {id}, found {e}");
            }
        }
        eprintln!("round {round}: {written} writes acknowledged, {} events after restart", events.len());
    }
    assert!(total_writes > rounds, "too few writes were acknowledged to test anything: {total_writes}");
    Ok(())
}
