//! Three real `coyote` processes on 127.0.0.1: forming a cluster with tokens, sharing one event log,
//! surviving kill -9 of the leader, and catching up after a restart.

use std::time::Duration;

use anyhow::Result;
use coyote_tests::{cluster, event_keys, leader_index, node_id, wait_until, Node};
use serde_json::Value;

fn create_service(node: &Node, name: &str, port: u16) -> Result<u64> {
    let v = node.cli_json(&[
        "service",
        "create",
        name,
        "--image",
        "busybox:test",
        "--port",
        &format!("{port}:80"),
    ])?;
    v["index"].as_u64().ok_or_else(|| anyhow::anyhow!("no index in {v}"))
}

fn indexes_of(events: &[Value], kind: &str) -> Vec<u64> {
    events.iter().filter(|e| e["kind"] == kind).filter_map(|e| e["index"].as_u64()).collect()
}

#[test]
fn three_nodes_share_one_log_and_survive_the_loss_of_the_leader() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = cluster(root.path(), 3)?;

    // An event proposed on any node appears on all three, in the same order.
    let mut acknowledged = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        acknowledged.push(create_service(node, &format!("svc{i}"), 8000 + i as u16)?);
    }
    let reference = wait_until("all nodes to show the same events", Duration::from_secs(20), || {
        let all: Vec<_> = nodes.iter().map(|n| n.events().map(|e| event_keys(&e))).collect::<Result<_>>()?;
        Ok((all.iter().all(|e| *e == all[0]) && all[0].len() >= 3 + 3 * 2).then(|| all[0].clone()))
    })?;
    let kinds: Vec<&str> = reference.iter().map(|e| e.1.as_str()).collect();
    assert_eq!(kinds[0], "cluster_created");
    assert_eq!(kinds.iter().filter(|k| **k == "node_joined").count(), 2);
    for index in &acknowledged {
        assert!(reference.iter().any(|e| e.0 == *index && e.1 == "service_created"), "event {index} missing");
    }

    // The same on every node through `status`: three members, one leader.
    for node in &nodes {
        let s = node.status()?;
        assert_eq!(s["members"].as_array().map(|m| m.len()), Some(3), "{s}");
        assert_eq!(s["cluster_id"], nodes[0].status()?["cluster_id"]);
    }

    // kill -9 the leader: the other two elect a leader and keep accepting events.
    let leader = leader_index(&nodes)?;
    nodes[leader].kill9();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for (k, &i) in survivors.iter().enumerate() {
        let index = wait_until("a write after the leader died", Duration::from_secs(30), || {
            Ok(create_service(&nodes[i], &format!("after{k}"), 9000 + k as u16).ok())
        })?;
        acknowledged.push(index);
    }
    let killed_id = node_id(&nodes[leader])?;
    for &i in &survivors {
        let s = nodes[i].status()?;
        assert!(s["leader"].as_u64().is_some_and(|l| l != killed_id), "survivor sees leader {}", s["leader"]);
    }

    // The killed node restarts from its directory and catches up; nothing committed is lost or
    // reordered.
    nodes[leader].restart()?;
    let after = wait_until("the restarted node to catch up", Duration::from_secs(30), || {
        let all: Vec<_> = nodes.iter().map(|n| n.events().map(|e| event_keys(&e))).collect::<Result<_>>()?;
        let done =
            all.iter().all(|e| *e == all[0]) && acknowledged.iter().all(|i| all[0].iter().any(|e| e.0 == *i));
        Ok(done.then(|| all[0].clone()))
    })?;
    assert_eq!(&after[..reference.len()], &reference[..], "history before the kill changed");
    let indexes: Vec<u64> = after.iter().map(|e| e.0).collect();
    assert!(indexes.windows(2).all(|w| w[0] < w[1]), "events out of order: {indexes:?}");
    let events = nodes[leader].events()?;
    assert_eq!(indexes_of(&events, "service_created").len(), 5);
    Ok(())
}
