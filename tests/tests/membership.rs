//! Servers come and go, for real: `coyote` processes on their own loopback addresses. A server that
//! died for good is removed and replaced, and is refused when it comes back; a master retires with
//! `coyote node leave` and its data goes with its services; a removal is refused while a majority
//! still reaches the server, unless forced.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use coyote_tests::{check_sequence, test_images, wait_until, DockerGuard, Node};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A cluster of three nodes, each on a loopback address of its own.
fn three(root: &std::path::Path, configure: impl Fn(&mut Node)) -> Result<Vec<Node>> {
    let mut nodes: Vec<Node> = Vec::new();
    for (i, ip) in ["127.0.0.1", "127.0.0.2", "127.0.0.3"].iter().enumerate() {
        let mut n = Node::on_ip(root, &format!("n{}", i + 1), ip);
        configure(&mut n);
        if i == 0 {
            n.up()?;
        } else {
            let token = nodes[0].token(&[])?;
            n.join(&token)?;
        }
        nodes.push(n);
    }
    wait_for_voters(&nodes[0], 3)?;
    Ok(nodes)
}

/// The ids of Raft's members as `node` sees them, once there are `n` voters and no learner.
fn wait_for_voters(node: &Node, n: usize) -> Result<BTreeSet<u64>> {
    wait_until(&format!("{n} voters"), TIMEOUT, || {
        let s = node.status()?;
        let members = s["members"].as_array().cloned().unwrap_or_default();
        let voters: BTreeSet<u64> =
            members.iter().filter(|m| m["role"] != "learner").filter_map(|m| m["id"].as_u64()).collect();
        Ok((voters.len() == n && members.len() == n).then_some(voters))
    })
}

fn services(node: &Node) -> Result<Vec<Value>> {
    node.cli_json_lines(&["service", "list"])
}

/// Every node a placement names.
fn placed(svc: &Value) -> BTreeSet<u64> {
    let p = &svc["placement"];
    let mut out: BTreeSet<u64> =
        p["backups"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
    out.extend(p["master"].as_u64());
    out.extend(p["failover"].as_u64());
    out
}

fn open_alarm(node: &Node, key: &str) -> Result<Option<Value>> {
    let alarms = node.cli_json_lines(&["alarm", "list"])?;
    Ok(alarms.into_iter().find(|a| a["key"] == key))
}

/// The services this node serves right now (its fence's answer).
fn serving(node: &Node) -> Result<BTreeSet<String>> {
    let (code, v) = node.api("GET", "/v1/serving", "")?;
    if code != 200 {
        bail!("GET /v1/serving answered {code}: {v}");
    }
    Ok(v["serving"].as_array().into_iter().flatten().filter_map(|s| s.as_str().map(String::from)).collect())
}

/// `Some` when every service is served by its master and by no other of `nodes`.
fn served_by_masters(nodes: &[&Node]) -> Result<Option<()>> {
    let list = services(nodes[0])?;
    for svc in &list {
        let name = svc["name"].as_str().unwrap_or_default().to_string();
        let master = svc["placement"]["master"].as_u64();
        for node in nodes {
            if serving(node)?.contains(&name) != (master == Some(node.id()?)) {
                return Ok(None);
            }
        }
    }
    Ok(Some(()))
}

#[test]
fn a_dead_server_is_removed_replaced_and_refused_when_it_returns() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = three(root.path(), |_| {})?;
    let ids: Vec<u64> = nodes.iter().map(Node::id).collect::<Result<_>>()?;
    for name in ["alpha", "beta", "gamma"] {
        nodes[0].cli_json(&["service", "create", name, "--image", "none:1"])?;
    }
    // The victim: a node that is not the leader, so that the test is about the removal and not an
    // election; nodes[0] takes the commands.
    let leader = nodes[0].status()?["leader"].as_u64().context("a leader")?;
    let v = if ids[2] != leader { 2 } else { 1 };
    let victim = ids[v];
    let mastered: Vec<String> = services(&nodes[0])?
        .iter()
        .filter(|s| s["placement"]["master"].as_u64() == Some(victim))
        .filter_map(|s| s["name"].as_str().map(String::from))
        .collect();
    assert!(!mastered.is_empty(), "the placement spreads masters over the three nodes");
    nodes[v].kill9();
    let killed = std::time::Instant::now();

    // `node remove` waits until the others report it unreachable and its failovers have taken its
    // services over (authority moves only by a switch), then removes it.
    let lines = nodes[0].cli_json_lines(&["node", "remove", &victim.to_string()])?;
    let (removed, waits) = lines.split_last().context("an answer")?;
    for w in waits {
        let detail = w["detail"].as_str().unwrap_or_default();
        assert!(
            w["step"] == "waiting"
                && (detail.contains("is not gone") || detail.contains("is still master of")),
            "{w}"
        );
    }
    eprintln!(
        "removed at event {} after {} waits, {:?} after the kill",
        removed["index"],
        waits.len(),
        killed.elapsed()
    );
    let events = nodes[0].events()?;
    for name in &mastered {
        let failover = events.iter().any(|e| {
            e["kind"] == "authority_switched"
                && e["outcome"] == "applied"
                && e["event"]["AuthoritySwitched"]["service"] == name.as_str()
        });
        assert!(failover, "{name} was switched to its failover before the removal");
    }
    let voters = wait_for_voters(&nodes[0], 2)?;
    assert!(!voters.contains(&victim), "Raft's membership shrank without node {victim}");
    eprintln!("membership of 2 voters {:?} after the kill", killed.elapsed());
    for svc in services(&nodes[0])? {
        assert!(!placed(&svc).contains(&victim), "a placement still names node {victim}: {svc}");
    }
    let status = nodes[0].status()?;
    assert_eq!(status["tolerance"]["can_lose"], 0, "{status}");
    assert_eq!(status["tolerance"]["voters"], 2, "{status}");
    let alarm = open_alarm(&nodes[0], "fault-tolerance")?.context("the fault-tolerance alarm is open")?;
    eprintln!("alarm: {}", alarm["message"]);
    let text = String::from_utf8_lossy(&nodes[0].cli(&["status"]).stdout).into_owned();
    assert!(text.contains("can lose 0 of 2 servers"), "{text}");

    // Every service is served again, each by its master alone.
    let live: Vec<&Node> = (0..3).filter(|i| *i != v).map(|i| &nodes[i]).collect();
    wait_until("every service to be served by its master", TIMEOUT, || served_by_masters(&live))?;

    // The replacement: a fourth server joins and takes the roles the removed one held.
    let token = nodes[0].token(&[])?;
    let mut fourth = Node::on_ip(root.path(), "n4", "127.0.0.4");
    fourth.join(&token)?;
    let new_id = fourth.id()?;
    assert!(!ids.contains(&new_id), "a new id, never the removed one's");
    let joining = std::time::Instant::now();
    wait_for_voters(&nodes[0], 3)?;
    eprintln!("the new server was a voter {:?} after its node was ready", joining.elapsed());
    wait_until("the roles to be refilled", TIMEOUT, || {
        let list = services(&nodes[0])?;
        let refilled = list.iter().all(|s| {
            let p = placed(s);
            !s["placement"]["failover"].is_null() && p.contains(&new_id) && !p.contains(&victim)
        });
        Ok(refilled.then_some(()))
    })?;
    wait_until("the alarm to clear", TIMEOUT, || {
        Ok(open_alarm(&nodes[0], "fault-tolerance")?.is_none().then_some(()))
    })?;
    let status = nodes[0].status()?;
    assert_eq!(status["tolerance"]["can_lose"], 1, "{status}");

    // The removed server comes back: it is refused, stops by itself, and disturbs no election.
    let before = nodes[0].status()?;
    nodes[v].start()?;
    let returned = std::time::Instant::now();
    let exit = nodes[v].wait_exit(TIMEOUT)?;
    eprintln!("the removed server stopped {:?} after it started again", returned.elapsed());
    assert!(!exit.success(), "a removed node that learns it was removed exits with an error");
    let log = nodes[v].log_text();
    // It learned it from the members' refusal: its own log never saw the removal.
    assert!(
        log.contains("no longer a member")
            && log.contains(&format!("node {victim} was removed from cluster")),
        "{log}"
    );
    assert!(nodes[v].dir.join("departed").exists());
    let after = nodes[0].status()?;
    assert_eq!(after["term"], before["term"], "the returning node's campaign changed the term");
    assert_eq!(after["leader"], before["leader"]);
    let live: Vec<&Node> = (0..3).filter(|i| *i != v).map(|i| &nodes[i]).chain([&fourth]).collect();
    assert!(served_by_masters(&live)?.is_some(), "every service is still served by its master alone");
    // Once more: it refuses at once, saying why.
    let out = std::process::Command::new(coyote_tests::coyote_bin())
        .args(["node", "--no-reconcile", "--no-proxy", "--no-crm", "--data"])
        .arg(&nodes[v].dir)
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no longer a member") && err.contains("new token"), "{err}");

    for n in nodes.iter_mut().chain([&mut fourth]) {
        n.kill9();
    }
    Ok(())
}

#[test]
fn a_removal_needs_force_while_a_majority_reaches_the_server() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = three(root.path(), |_| {})?;
    let ids: Vec<u64> = nodes.iter().map(Node::id).collect::<Result<_>>()?;
    let err = nodes[0].cli_err(&["node", "remove", &ids[2].to_string(), "--wait", "0"])?;
    assert!(err.contains("is not gone") && err.contains("--force"), "{err}");
    let err = nodes[0].cli_err(&["node", "remove", &ids[0].to_string()])?;
    assert!(err.contains("node leave"), "{err}");
    let err = nodes[0].cli_err(&["node", "remove", "99"])?;
    assert!(err.contains("not a member"), "{err}");
    // Nothing was changed by the refusals.
    wait_for_voters(&nodes[0], 3)?;

    nodes[0].cli_json(&[
        "node",
        "remove",
        &ids[2].to_string(),
        "--force",
        "--reason",
        "retired in a hurry",
    ])?;
    // The removed server, still running, stops by itself.
    nodes[2].wait_exit(TIMEOUT)?;
    assert!(nodes[2].dir.join("departed").exists());
    let voters = wait_for_voters(&nodes[0], 2)?;
    assert_eq!(voters, BTreeSet::from([ids[0], ids[1]]));
    let events = nodes[1].events()?;
    let removal = events.iter().find(|e| e["kind"] == "node_removed").context("the removal is an event")?;
    assert_eq!(removal["outcome"], "applied", "{removal}");
    assert!(removal["summary"].as_str().unwrap_or_default().contains("by force"), "{removal}");
    // The two left still make changes.
    nodes[1].cli_json(&["service", "create", "after", "--image", "none:1"])?;
    for n in &mut nodes {
        n.kill9();
    }
    Ok(())
}

#[test]
fn a_master_leaves_and_its_data_goes_with_its_service() -> Result<()> {
    test_images()?;
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let mut nodes = three(root.path(), |n| {
        n.containers = true;
        n.flags = vec!["--backup-every".into(), "1s".into(), "--forward".into(), "userspace".into()];
    })?;
    guard.cluster_ids.push(nodes[0].cluster_id()?);
    let ids: Vec<u64> = nodes.iter().map(Node::id).collect::<Result<_>>()?;
    let service = format!("leave{}", std::process::id());
    let created = nodes[0].cli_json(&["service", "create", &service, "--image", "coyote-test/seq:1"])?;
    let master = created["placement"]["master"].as_u64().context("a master")?;
    let m = ids.iter().position(|i| *i == master).context("master")?;
    let old_volume = nodes[m].dir.join("volumes").join(&service).join("seq");
    wait_until("the master's container to write", TIMEOUT, || {
        let text = std::fs::read_to_string(&old_volume).unwrap_or_default();
        Ok((text.lines().count() > 10).then_some(()))
    })?;

    let leaving = std::time::Instant::now();
    let steps = nodes[m].cli_json_lines(&["node", "leave"])?;
    eprintln!("node leave took {:?}", leaving.elapsed());
    let kinds: Vec<&str> = steps.iter().filter_map(|s| s["step"].as_str()).collect();
    assert_eq!(kinds, ["handover", "handed_over", "left", "stopping", "stopped", "kept"], "{steps:?}");
    nodes[m].wait_exit(TIMEOUT)?;
    assert!(nodes[m].dir.exists(), "the data directory stays without --purge");
    let filter = format!("label=coyote.node={master}");
    let cluster = format!("label=coyote.cluster={}", guard.cluster_ids[0]);
    let left = coyote_tests::docker(&["ps", "-aq", "--filter", &filter, "--filter", &cluster])?;
    assert!(left.trim().is_empty(), "the node that left removed its containers: {left}");

    let other = (0..3).find(|i| *i != m).context("another node")?;
    let show = nodes[other].cli_json(&["service", "show", &service])?;
    let new_master = show["placement"]["master"].as_u64().context("a master")?;
    assert!(!placed(&show).contains(&master), "{show}");
    let n = ids.iter().position(|i| *i == new_master).context("new master")?;
    // Nothing the container wrote is lost: the new master's data goes on from the old one's.
    let old = std::fs::read_to_string(&old_volume)?;
    let old_last = check_sequence(&old, "the old master's data")?;
    let new_volume = nodes[n].dir.join("volumes").join(&service).join("seq");
    wait_until("the new master's container to write", TIMEOUT, || {
        let Ok(text) = std::fs::read_to_string(&new_volume) else { return Ok(None) };
        let last = check_sequence(&text, "the new master's data")?;
        Ok((last > old_last + 3).then_some(()))
    })?;
    let new = std::fs::read_to_string(&new_volume)?;
    assert!(new.starts_with(&old), "the new master's data begins with everything the old master wrote");
    let voters = wait_for_voters(&nodes[other], 2)?;
    assert!(!voters.contains(&master));
    // Every event acknowledged before the leave is still there, on both nodes that remain.
    let events = nodes[other].events()?;
    assert!(events.iter().any(|e| e["kind"] == "node_left" && e["outcome"] == "applied"));
    assert!(events.iter().any(|e| e["kind"] == "service_created" && e["outcome"] == "applied"));

    // It does not start again.
    let out = std::process::Command::new(coyote_tests::coyote_bin())
        .args(["node", "--no-reconcile", "--no-proxy", "--no-crm", "--data"])
        .arg(&nodes[m].dir)
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no longer a member"));

    // Now the Raft leader leaves: the last server takes over, with every event and the data.
    let leader = nodes[other].status()?["leader"].as_u64().context("a leader")?;
    let l = ids.iter().position(|i| *i == leader).context("the leader's node")?;
    let last = (0..3).find(|i| *i != m && *i != l).context("the last node")?;
    let before = nodes[last].events()?.len();
    // What the current master wrote so far (its directory may be the one purged below).
    let latest = std::fs::read_to_string(&new_volume)?;
    let steps = nodes[l].cli_json_lines(&["node", "leave", "--purge"])?;
    assert_eq!(steps.last().and_then(|s| s["step"].as_str()), Some("purged"), "{steps:?}");
    nodes[l].wait_exit(TIMEOUT)?;
    assert!(!nodes[l].dir.exists(), "--purge deletes the data directory");
    let voters = wait_for_voters(&nodes[last], 1)?;
    assert_eq!(voters, BTreeSet::from([ids[last]]));
    let show = nodes[last].cli_json(&["service", "show", &service])?;
    assert_eq!(show["placement"]["master"].as_u64(), Some(ids[last]), "{show}");
    let events = nodes[last].events()?;
    assert!(events.len() > before, "the leave is in the last server's log");
    let lefts = events.iter().filter(|e| e["kind"] == "node_left" && e["outcome"] == "applied").count();
    assert_eq!(lefts, 2);
    let volume = nodes[last].dir.join("volumes").join(&service).join("seq");
    wait_until("the last server's container to write", TIMEOUT, || {
        let Ok(text) = std::fs::read_to_string(&volume) else { return Ok(None) };
        check_sequence(&text, "the last server's data")?;
        Ok((text.starts_with(&latest) && text.len() > latest.len()).then_some(()))
    })?;
    // A lone server can lose none, and says so without an alarm.
    let status = nodes[last].status()?;
    assert_eq!(
        (status["tolerance"]["can_lose"].as_u64(), status["tolerance"]["voters"].as_u64()),
        (Some(0), Some(1))
    );
    assert!(open_alarm(&nodes[last], "fault-tolerance")?.is_none());

    for n in &mut nodes {
        n.kill9();
    }
    guard.clean();
    Ok(())
}
