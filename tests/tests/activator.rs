//! The activator against the real Docker Engine: an on-demand service's container stays stopped until
//! a connection arrives on its port; the first request is held while the container starts, and gets
//! its answer; concurrent first requests share one start; after the idle time the container stops,
//! after its dump command; a failing dump keeps it running and raises an alarm, cleared when a later
//! dump succeeds; under memory pressure idle containers stop, least recently used first.

use std::net::TcpStream;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
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

fn container_id(cluster: &str, service: &str) -> Result<String> {
    let out = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=coyote.cluster={cluster}"),
        "--filter",
        &format!("label=coyote.service={service}"),
    ])?;
    out.split_whitespace().next().map(String::from).ok_or_else(|| anyhow!("no container for {service}"))
}

/// When the service's container last stopped, as (date, seconds into the day) from Docker's
/// `FinishedAt` (RFC 3339 with up to nine digits of fraction, trailing zeros trimmed).
fn finished_at(cluster: &str, service: &str) -> Result<(String, f64)> {
    let id = container_id(cluster, service)?;
    let text = docker(&["inspect", "-f", "{{.State.FinishedAt}}", &id])?;
    let text = text.trim();
    let (date, time) = text.split_once('T').ok_or_else(|| anyhow!("FinishedAt {text:?}"))?;
    let time = time.trim_end_matches('Z');
    let parts: Vec<f64> = time.split(':').map(|p| p.parse::<f64>()).collect::<Result<_, _>>()?;
    let [h, m, s] = parts[..] else { bail!("FinishedAt {text:?}") };
    Ok((date.to_string(), h * 3600.0 + m * 60.0 + s))
}

/// A node that manages containers, with extra flags; returns it and its cluster id (registered with
/// the guard, so its containers go when the test ends).
fn node_with(root: &std::path::Path, guard: &mut DockerGuard, flags: &[&str]) -> Result<(Node, String)> {
    let mut node = Node::new(root, "n1");
    node.containers = true;
    node.flags.extend(flags.iter().map(|f| f.to_string()));
    node.up()?;
    let cluster = node.cluster_id()?;
    guard.cluster_ids.push(cluster.clone());
    Ok((node, cluster))
}

fn stats_of(node: &Node, service: &str) -> Result<Option<Value>> {
    Ok(node.cli_json_lines(&["stats"])?.into_iter().find(|s| s["service"] == service))
}

fn open_alarm(node: &Node, key: &str) -> Result<Option<Value>> {
    Ok(node.cli_json_lines(&["alarm", "list"])?.into_iter().find(|a| a["key"] == key))
}

/// Creates an on-demand httpd service and waits until the activator listens for it.
fn on_demand(node: &Node, cluster: &str, service: &str, port: u16, extra: &[&str]) -> Result<()> {
    let mut args = vec!["service", "create", service, "--image", "coyote-test/httpd:1", "--on-demand"];
    let port_arg = format!("{port}:80");
    args.extend(["--port", &port_arg]);
    args.extend_from_slice(extra);
    node.cli_json(&args)?;
    wait_until("the container to be created", Duration::from_secs(60), || {
        Ok(state_of(cluster, service)?.filter(|s| s == "created" || s == "exited"))
    })?;
    wait_until("the activator to listen", Duration::from_secs(30), || stats_of(node, service))?;
    Ok(())
}

fn wait_state(cluster: &str, service: &str, running: bool, within: Duration) -> Result<()> {
    let what = format!("{service} to be {}", if running { "running" } else { "stopped" });
    wait_until(&what, within, || Ok(state_of(cluster, service)?.filter(|s| (s == "running") == running)))?;
    Ok(())
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

#[test]
fn a_container_left_running_by_a_previous_run_is_stopped_when_idle() -> Result<()> {
    test_images()?;
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let (mut node, cluster) = node_with(root.path(), &mut guard, &["--idle-stop", "1h"])?;
    let service = format!("adopt{}", std::process::id());
    let port = free_port();
    on_demand(&node, &cluster, &service, port, &[])?;
    assert!(http_get(port)?.contains(" 200 "));
    assert_eq!(state_of(&cluster, &service)?.as_deref(), Some("running"));

    // The node dies; its container keeps running. The next run, with a short idle time, takes it over.
    node.kill9();
    node.flags = vec!["--idle-stop".into(), "3s".into()];
    node.restart()?;
    wait_until("the activator to listen again", Duration::from_secs(30), || stats_of(&node, &service))?;
    assert_eq!(state_of(&cluster, &service)?.as_deref(), Some("running"), "not stopped at once");
    let s = stats_of(&node, &service)?.expect("stats");
    assert_eq!(s["running"], true, "the running container is known: {s}");
    wait_state(&cluster, &service, false, Duration::from_secs(30))?;
    let s = stats_of(&node, &service)?.expect("stats");
    assert_eq!((s["idle_stops"].as_u64(), s["cold_starts"].as_u64()), (Some(1), Some(0)), "{s}");
    // And it starts again on the next connection.
    assert!(http_get(port)?.contains(" 200 "));
    Ok(())
}

#[test]
fn the_dump_command_runs_before_an_idle_stop() -> Result<()> {
    test_images()?;
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let (node, cluster) = node_with(root.path(), &mut guard, &["--idle-stop", "2s"])?;
    let service = format!("dump{}", std::process::id());
    let port = free_port();
    // The image has no /bin/sh: busybox is the shell.
    let dump = r#"/bin/busybox sh -c "echo dumped > /data/dump.txt""#;
    on_demand(&node, &cluster, &service, port, &["--dump", dump])?;
    let shown = node.cli_json(&["service", "show", &service])?;
    assert_eq!(
        shown["spec"]["dump"],
        serde_json::json!(["/bin/busybox", "sh", "-c", "echo dumped > /data/dump.txt"]),
        "{shown}"
    );
    let dumped = node.dir.join("volumes").join(&service).join("dump.txt");

    assert!(http_get(port)?.contains(" 200 "));
    assert_eq!(state_of(&cluster, &service)?.as_deref(), Some("running"));
    assert!(!dumped.exists(), "no dump before the idle stop");
    wait_state(&cluster, &service, false, Duration::from_secs(20))?;
    // `docker exec` runs only in a running container: the file proves the dump ran before the stop.
    let text = std::fs::read_to_string(&dumped).context("the dump's file in the volume")?;
    assert_eq!(text.trim(), "dumped");
    let s = stats_of(&node, &service)?.expect("stats");
    assert_eq!((s["idle_stops"].as_u64(), s["dumps_failed"].as_u64()), (Some(1), Some(0)), "{s}");
    assert!(open_alarm(&node, &format!("dump-failed/1/{service}"))?.is_none());
    Ok(())
}

#[test]
fn a_failing_dump_keeps_the_container_running_and_raises_an_alarm_until_a_dump_succeeds() -> Result<()> {
    test_images()?;
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let (node, cluster) = node_with(root.path(), &mut guard, &["--idle-stop", "2s"])?;
    let service = format!("fail{}", std::process::id());
    let port = free_port();
    let dump = r#"/bin/busybox sh -c "test -f /data/ok || { echo cannot reach the database >&2; exit 7; }""#;
    on_demand(&node, &cluster, &service, port, &["--dump", dump])?;

    assert!(http_get(port)?.contains(" 200 "));
    let key = format!("dump-failed/1/{service}");
    let alarm = wait_until("the dump alarm", Duration::from_secs(20), || open_alarm(&node, &key))?;
    let message = alarm["message"].as_str().unwrap_or_default();
    assert!(message.contains("exit code 7"), "{message}");
    assert!(message.contains("cannot reach the database"), "{message}");
    // Still running, well past the idle time, and still serving.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(state_of(&cluster, &service)?.as_deref(), Some("running"));
    let s = stats_of(&node, &service)?.expect("stats");
    assert_eq!(s["idle_stops"], 0, "{s}");
    assert!(s["dumps_failed"].as_u64() >= Some(1), "{s}");
    assert_eq!(s["running"], true, "{s}");
    let alarms = node.cli_json_lines(&["alarm", "list"])?;
    assert_eq!(alarms.iter().filter(|a| a["key"] == key.as_str()).count(), 1, "one alarm, not one per try");

    // The dump can succeed now: at its next try the container is dumped and stopped, the alarm cleared.
    std::fs::write(node.dir.join("volumes").join(&service).join("ok"), "")?;
    wait_state(&cluster, &service, false, Duration::from_secs(30))?;
    wait_until("the alarm to clear", Duration::from_secs(10), || {
        Ok(open_alarm(&node, &key)?.is_none().then_some(()))
    })?;
    let cleared = node.events()?.into_iter().any(|e| {
        e["kind"] == "alarm_cleared"
            && e["summary"].as_str().unwrap_or("").contains("the dump command succeeded")
    });
    assert!(cleared, "the alarm is cleared by the successful dump");
    let s = stats_of(&node, &service)?.expect("stats");
    assert_eq!(s["idle_stops"], 1, "{s}");
    Ok(())
}

fn mem_available() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    let line = text.lines().find_map(|l| l.strip_prefix("MemAvailable:")).context("MemAvailable")?;
    let kb: u64 = line.split_whitespace().next().context("MemAvailable value")?.parse()?;
    Ok(kb * 1024)
}

#[test]
fn under_memory_pressure_idle_on_demand_containers_stop_least_recently_used_first() -> Result<()> {
    test_images()?;
    // A threshold far above what this host has: memory stays short whatever is stopped.
    let threshold = "1000T";
    assert!(mem_available()? < 1000 << 40);
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    // The idle time is long: every stop here is for memory.
    let (node, cluster) =
        node_with(root.path(), &mut guard, &["--idle-stop", "1h", "--memory-min-available", threshold])?;
    let pid = std::process::id();
    let (a, b, always) = (format!("lru-a{pid}"), format!("lru-b{pid}"), format!("lru-on{pid}"));
    let (port_a, port_b) = (free_port(), free_port());
    on_demand(&node, &cluster, &a, port_a, &["--dump", r#"/bin/busybox sh -c "echo a > /data/dump.txt""#])?;
    on_demand(&node, &cluster, &b, port_b, &[])?;
    let port_on = free_port();
    node.cli_json(&[
        "service",
        "create",
        &always,
        "--image",
        "coyote-test/httpd:1",
        "--port",
        &format!("{port_on}:80"),
    ])?;
    wait_state(&cluster, &always, true, Duration::from_secs(60))?;

    // Open connections keep a container from being stopped, whatever the memory: hold one to each,
    // then let go of A's first, then of B's. A is the least recently used.
    let conn_a = TcpStream::connect(("127.0.0.1", port_a))?;
    wait_state(&cluster, &a, true, Duration::from_secs(20))?;
    let conn_b = TcpStream::connect(("127.0.0.1", port_b))?;
    wait_state(&cluster, &b, true, Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(state_of(&cluster, &a)?.as_deref(), Some("running"), "a connection is open to A");
    // Close together, so that both are idle when the activator next looks (it looks every 500 ms).
    drop(conn_a);
    std::thread::sleep(Duration::from_millis(30));
    drop(conn_b);

    wait_state(&cluster, &a, false, Duration::from_secs(20))?;
    wait_state(&cluster, &b, false, Duration::from_secs(20))?;
    let (fa, fb) = (finished_at(&cluster, &a)?, finished_at(&cluster, &b)?);
    assert!(fa < fb, "A (used least recently) must stop before B: A at {fa:?}, B at {fb:?}");
    // A's dump ran before its stop; the always-on service is never stopped for memory.
    let dumped = node.dir.join("volumes").join(&a).join("dump.txt");
    assert_eq!(std::fs::read_to_string(&dumped).context("A's dump")?.trim(), "a");
    assert_eq!(state_of(&cluster, &always)?.as_deref(), Some("running"));
    for service in [&a, &b] {
        let s = stats_of(&node, service)?.expect("stats");
        assert_eq!((s["memory_stops"].as_u64(), s["idle_stops"].as_u64()), (Some(1), Some(0)), "{s}");
    }
    // Still on demand under pressure: a request starts A again and gets its page.
    assert!(http_get(port_a)?.contains(" 200 "));
    wait_state(&cluster, &a, false, Duration::from_secs(20))?;
    assert_eq!(state_of(&cluster, &always)?.as_deref(), Some("running"));
    assert!(node.log_text().contains("memory is short"), "the node says why it stops containers");
    Ok(())
}
