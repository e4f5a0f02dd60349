//! The same failover as in the simulator, for real: three `coyote` processes, each on its own loopback
//! address; the master of a service is killed (with the TCP endpoint it served), and the failover takes
//! over by itself, after its monitor probed the real endpoint and a majority agreed the master is gone.

use std::net::TcpListener;
use std::time::Duration;

use anyhow::Result;
use coyote_tests::{free_port_on, node_id, wait_until, Node};
use serde_json::Value;

#[test]
fn the_failover_takes_over_when_the_master_dies() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = vec![Node::on_ip(root.path(), "n1", "127.0.0.1")];
    nodes[0].up()?;
    for (i, ip) in ["127.0.0.2", "127.0.0.3"].iter().enumerate() {
        let token = nodes[0].token(&[])?;
        let mut n = Node::on_ip(root.path(), &format!("n{}", i + 2), ip);
        n.join(&token)?;
        nodes.push(n);
    }
    let ids: Vec<u64> = nodes.iter().map(node_id).collect::<Result<_>>()?;

    // The service's port, free on all three addresses; node 1 will be its master, and this listener
    // stands in for the container it runs there.
    let port = loop {
        let p = free_port_on("127.0.0.1");
        if ["127.0.0.2", "127.0.0.3"].iter().all(|ip| TcpListener::bind((*ip, p)).is_ok()) {
            break p;
        }
    };
    let endpoint = TcpListener::bind(("127.0.0.1", port))?;
    let created = nodes[0].cli_json(&[
        "service",
        "create",
        "web",
        "--image",
        "none:1",
        "--port",
        &format!("{port}:80"),
    ])?;
    assert_eq!(created["placement"]["master"].as_u64(), Some(ids[0]), "{created}");
    let failover = created["placement"]["failover"].as_u64().expect("a failover");
    let failover_index = ids.iter().position(|i| *i == failover).unwrap();

    // Healthy for a while: nobody takes over a service that answers. What is tested is that time
    // passing changes nothing, so this waits on the clock: the monitors' rounds of probes (every
    // 200 ms) are not observable through the API or the log (only reachability transitions are
    // logged, and a healthy service has none), so there is no exact signal to wait for. 3 s is about
    // 15 rounds, and 12 times the 250 ms a failover waits before it may take over.
    std::thread::sleep(Duration::from_secs(3));
    let switches = |node: &Node| -> Result<Vec<Value>> {
        Ok(node.events()?.into_iter().filter(|e| e["kind"] == "authority_switched").collect())
    };
    assert!(switches(&nodes[1])?.is_empty(), "a healthy service was taken over");

    // The master dies with its endpoint.
    nodes[0].kill9();
    drop(endpoint);
    let killed_at = std::time::Instant::now();
    let switch = wait_until("the failover to take over", Duration::from_secs(30), || {
        Ok(switches(&nodes[failover_index])?.into_iter().find(|e| e["outcome"] == "applied"))
    })?;
    eprintln!("failover after {:?}: {}", killed_at.elapsed(), switch["summary"]);
    assert_eq!(switch["event"]["AuthoritySwitched"]["cause"], "Failover", "{switch}");
    assert_eq!(switch["event"]["AuthoritySwitched"]["to"].as_u64(), Some(failover));

    // The slot is refilled, and the old master became a backup.
    let show = wait_until("the failover slot to be refilled", Duration::from_secs(20), || {
        let s = nodes[failover_index].cli_json(&["service", "show", "web"])?;
        Ok((!s["placement"]["failover"].is_null()).then_some(s))
    })?;
    let placement = &show["placement"];
    assert_eq!(placement["master"].as_u64(), Some(failover), "{show}");
    assert!(placement["backups"].as_array().unwrap().iter().any(|b| b.as_u64() == Some(ids[0])), "{show}");

    // The old master returns, catches up, and stays a backup.
    nodes[0].restart()?;
    wait_until("the old master to see itself a backup", Duration::from_secs(20), || {
        let s = nodes[0].cli_json(&["service", "show", "web"])?;
        Ok((s["placement"]["master"].as_u64() == Some(failover)).then_some(()))
    })?;
    Ok(())
}
