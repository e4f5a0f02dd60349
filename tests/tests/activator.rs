//! The activator against the real Docker Engine: an on-demand service's container stays stopped until
//! a connection arrives on its port; the first request is held while the container starts, and gets
//! its answer; concurrent first requests share one start; after the idle time the container stops.

use std::time::Duration;

use anyhow::Result;
use coyote_tests::{docker, free_port, http_get, test_images, wait_until, DockerGuard, Node};
use serde_json::Value;

fn state_of(cluster: &str, service: &str) -> Result<Option<String>> {
    let out = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=coyote.cluster={cluster}"),
        "--filter",
        &format!("label=coyote.service={service}"),
        "--format",
        "{{.State}}",
    ])?;
    Ok(out.lines().next().map(|s| s.trim().to_string()))
}

#[test]
fn an_on_demand_service_starts_on_the_first_connection_and_stops_when_idle() -> Result<()> {
    test_images()?;
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let mut node = Node::new(root.path(), "n1");
    node.containers = true;
    node.flags.extend(["--idle-stop".to_string(), "3s".to_string()]);
    node.up()?;
    let cluster = node.cluster_id()?;
    guard.cluster_ids.push(cluster.clone());

    let port = free_port();
    let service = format!("od{}", std::process::id());
    node.cli_json(&[
        "service",
        "create",
        &service,
        "--image",
        "coyote-test/httpd:1",
        "--port",
        &format!("{port}:80"),
        "--on-demand",
    ])?;
    // Created, and left stopped, while the activator listens on the port.
    wait_until("the container to be created", Duration::from_secs(60), || {
        Ok(state_of(&cluster, &service)?.filter(|s| s == "created" || s == "exited"))
    })?;
    // The activator lists a service in its stats once it listens on the service's ports.
    let stats_of = |node: &Node| -> Result<Option<Value>> {
        Ok(node.cli_json_lines(&["stats"])?.into_iter().find(|s| s["service"] == service.as_str()))
    };
    let s = wait_until("the activator to listen", Duration::from_secs(30), || stats_of(&node))?;
    assert_eq!(s["cold_starts"], 0, "{s}");
    assert_eq!(state_of(&cluster, &service)?.as_deref().map(|s| s != "running"), Some(true));

    // Four concurrent first requests: all get the page, through one start.
    let answers: Vec<_> = (0..4).map(|_| std::thread::spawn(move || http_get(port))).collect();
    for a in answers {
        let page = a.join().unwrap()?;
        assert!(page.starts_with("HTTP/1.") && page.contains(" 200 "), "first request got: {page}");
    }
    assert_eq!(state_of(&cluster, &service)?.as_deref(), Some("running"));
    let s = stats_of(&node)?.expect("stats of the service");
    assert!(s["connections"].as_u64().unwrap() >= 4, "{s}");
    assert!(s["bytes_out"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["cold_starts"], 1, "four concurrent first connections must share one start: {s}");

    // Idle: stopped again after the idle time, and a new request starts it again.
    wait_until("the idle stop", Duration::from_secs(30), || {
        Ok(state_of(&cluster, &service)?.filter(|s| s != "running"))
    })?;
    let page = http_get(port)?;
    assert!(page.contains(" 200 "), "{page}");
    let s = stats_of(&node)?.expect("stats of the service");
    assert_eq!(s["cold_starts"], 2, "{s}");
    eprintln!("stats: {s}");
    Ok(())
}
