//! The reconciler against the real Docker Engine of this machine: services created with the CLI
//! become labelled containers, drift is repaired, spec changes replace containers, and what cannot be
//! done (a missing image, a wrong socket, a crash loop, a taken port) becomes one alarm that clears
//! when it heals.
//!
//! No registry is reachable here, so the images are built from a static busybox first
//! (`scripts/test-images.sh`). Every test cluster has a random id, carried by its containers'
//! `coyote.cluster` label; a [`DockerGuard`] removes them at the end, even when a test fails.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use coyote_tests::{docker, free_port, http_get, test_images, wait_until, DockerGuard, Node};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A name unique to this test run, so parallel runs never share a service or an image tag.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

/// A single-node cluster that manages containers, with a guard that removes them at the end.
fn node_with_docker(root: &std::path::Path, guard: &mut DockerGuard, flags: &[&str]) -> Result<Node> {
    test_images()?;
    let mut node = Node::new(root, "n1");
    node.containers = true;
    node.flags.extend(flags.iter().map(|f| f.to_string()));
    node.up()?;
    guard.cluster_ids.push(node.cluster_id()?);
    Ok(node)
}

/// `docker inspect` of every container of `cluster` for `service`.
fn containers(cluster: &str, service: &str) -> Result<Vec<Value>> {
    let ids = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=coyote.cluster={cluster}"),
        "--filter",
        &format!("label=coyote.service={service}"),
    ])?;
    // One at a time: a reconciler may remove a container between the listing and its inspection.
    let mut found = Vec::new();
    for id in ids.split_whitespace() {
        match docker(&["inspect", id]) {
            Ok(text) => {
                found.extend(serde_json::from_str::<Value>(&text)?.as_array().cloned().unwrap_or_default())
            }
            Err(e) if e.to_string().contains("No such object") => {}
            Err(e) => return Err(e),
        }
    }
    Ok(found)
}

/// Whether node `node` runs a container of `service` now.
fn runs_on(cluster: &str, service: &str, node: u64) -> Result<bool> {
    Ok(container_on(cluster, service, node)?.is_some_and(|c| c["State"]["Running"] == true))
}

/// The engine's `die` and `start` events of `service`'s containers since `since` (seconds since
/// the epoch), as (nanoseconds, action, node label): they stay known after a container is removed.
fn life_events(cluster: &str, service: &str, since: f64) -> Result<Vec<(u128, String, String)>> {
    let until = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64() + 1.0;
    let out = docker(&[
        "events",
        "--since",
        &format!("{since:.3}"),
        "--until",
        &format!("{until:.3}"),
        "--filter",
        &format!("label=coyote.cluster={cluster}"),
        "--filter",
        &format!("label=coyote.service={service}"),
        "--filter",
        "event=die",
        "--filter",
        "event=start",
        "--format",
        r#"{{.TimeNano}} {{.Action}} {{index .Actor.Attributes "coyote.node"}}"#,
    ])?;
    out.lines()
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w[..] {
                [t, action, node] => Ok((t.parse()?, action.to_string(), node.to_string())),
                _ => bail!("docker events line {l:?}"),
            }
        })
        .collect()
}

/// The one running container of `service` whose spec label is `spec_hash`, once there is exactly one
/// container and it runs.
fn wait_running(cluster: &str, service: &str, spec_hash: &str) -> Result<Value> {
    wait_until(&format!("{service} to run with spec {spec_hash}"), TIMEOUT, || {
        let list = containers(cluster, service)?;
        Ok(match &list[..] {
            [c] if c["State"]["Running"] == true && c["Config"]["Labels"]["coyote.spec"] == spec_hash => {
                Some(c.clone())
            }
            _ => None,
        })
    })
}

fn spec_hash(node: &Node, service: &str) -> Result<String> {
    let s = node.cli_json(&["service", "show", service])?;
    s["spec_hash"].as_str().map(String::from).ok_or_else(|| anyhow!("no spec_hash in {s}"))
}

fn open_alarm(node: &Node, key: &str) -> Result<Option<Value>> {
    Ok(node.cli_json_lines(&["alarm", "list"])?.into_iter().find(|a| a["key"] == key))
}

/// How many times an alarm with `key` was raised, in the whole history.
fn raised(node: &Node, key: &str) -> Result<usize> {
    let events = node.cli_json_lines(&["events", "tail", "--kind", "alarm_raised"])?;
    Ok(events.iter().filter(|e| e["outcome"] == "applied" && e["event"]["AlarmRaised"]["key"] == key).count())
}

#[test]
fn containers_follow_the_log_and_drift_is_repaired() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let node = node_with_docker(root.path(), &mut guard, &[])?;
    let cluster = node.cluster_id()?;
    let service = unique("web");
    let port = free_port();

    // Created with the CLI: a running container with our labels, limits, port, volume and network.
    node.cli_json(&[
        "service",
        "create",
        &service,
        "--image",
        "coyote-test/httpd:1",
        "--port",
        &format!("{port}:80"),
        "--memory",
        "64M",
    ])?;
    let hash1 = spec_hash(&node, &service)?;
    let c = wait_running(&cluster, &service, &hash1)?;
    let labels = &c["Config"]["Labels"];
    assert_eq!(labels["coyote.service"], service.as_str());
    assert_eq!(labels["coyote.cluster"], cluster.as_str());
    assert_eq!(labels["coyote.node"], "1");
    assert_eq!(c["HostConfig"]["Memory"], 64 << 20);
    assert_eq!(c["HostConfig"]["PortBindings"]["80/tcp"][0]["HostPort"], port.to_string());
    assert_eq!(c["HostConfig"]["NetworkMode"], "coyote");
    let volume = std::path::absolute(&node.dir)?.join("volumes").join(&service);
    assert_eq!(c["HostConfig"]["Binds"][0], format!("{}:/data", volume.display()));
    assert!(volume.is_dir(), "the volume directory was not created");
    // The engine's port forwarder accepts before the server in the container listens (the
    // connection is then closed empty), so wait for an answer, not for a connection.
    let body = wait_until("the service to answer", TIMEOUT, || {
        Ok(http_get(port).ok().filter(|b| b.contains("coyote test 1")))
    })?;
    assert!(body.contains("coyote test 1"), "{body}");

    // Converged: the plan is empty.
    let plan = node.cli_json(&["plan"])?;
    assert_eq!(plan["actions"], Value::Array(vec![]), "{plan}");
    assert_eq!(plan["observed"].as_array().map(|o| o.len()), Some(1), "{plan}");

    // Removed by hand: it comes back.
    let first_id = c["Id"].as_str().unwrap().to_string();
    docker(&["rm", "-f", &first_id])?;
    let c = wait_running(&cluster, &service, &hash1)?;
    assert_ne!(c["Id"].as_str(), Some(first_id.as_str()));

    // Stopped by hand: started again.
    let id = c["Id"].as_str().unwrap().to_string();
    docker(&["stop", "-t", "1", &id])?;
    let c = wait_running(&cluster, &service, &hash1)?;
    assert_eq!(c["Id"].as_str(), Some(id.as_str()), "a stopped container is started, not replaced");

    // A spec change replaces it.
    node.cli_json(&["service", "update", &service, "--image", "coyote-test/httpd:2"])?;
    let hash2 = spec_hash(&node, &service)?;
    assert_ne!(hash1, hash2);
    let c = wait_running(&cluster, &service, &hash2)?;
    assert_eq!(c["Config"]["Image"], "coyote-test/httpd:2");
    let body = wait_until("the new version to answer", TIMEOUT, || {
        Ok(http_get(port).ok().filter(|b| b.contains("coyote test 2")))
    })?;
    assert!(body.contains("coyote test 2"));

    // Removed from the log: the container goes.
    node.cli_json(&["service", "rm", &service])?;
    wait_until("the container to be removed", TIMEOUT, || {
        Ok(containers(&cluster, &service)?.is_empty().then_some(()))
    })?;
    // None of this raised an alarm.
    assert!(node.cli_json_lines(&["alarm", "list"])?.is_empty());
    Ok(())
}

#[test]
fn a_missing_image_raises_one_alarm_that_clears_when_the_image_is_built() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let node = node_with_docker(root.path(), &mut guard, &[])?;
    let cluster = node.cluster_id()?;
    let service = unique("late");
    let image = format!("coyote-test/{}:1", unique("missing"));

    node.cli_json(&["service", "create", &service, "--image", &image])?;
    let key = format!("image-missing/1/{service}");
    let alarm = wait_until("the image-missing alarm", TIMEOUT, || open_alarm(&node, &key))?;
    let message = alarm["message"].as_str().unwrap_or("");
    assert!(message.contains(&image), "{message}");
    assert_eq!(alarm["service"], service.as_str());
    // The plan says what it would do; nothing was created.
    let plan = node.cli_json(&["plan"])?;
    assert_eq!(plan["actions"][0]["action"], "create", "{plan}");
    assert!(containers(&cluster, &service)?.is_empty());

    // Passes later the problem is still one alarm, not one per pass.
    node.wait_two_reconciler_passes()?;
    assert_eq!(raised(&node, &key)?, 1);

    // The image appears (built or loaded): the container comes up and the alarm is cleared.
    docker(&["tag", "coyote-test/httpd:1", &image])?;
    guard.image_tags.push(image.clone());
    wait_running(&cluster, &service, &spec_hash(&node, &service)?)?;
    wait_until("the alarm to clear", TIMEOUT, || Ok(open_alarm(&node, &key)?.is_none().then_some(())))?;
    let cleared = node.cli_json_lines(&["events", "tail", "--kind", "alarm_cleared"])?;
    assert!(cleared.iter().any(|e| e["event"]["AlarmCleared"]["alarm_id"] == alarm["id"]), "{cleared:?}");
    Ok(())
}

#[test]
fn a_wrong_docker_socket_is_an_alarm_not_a_crash() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let missing = root.path().join("no-such-docker.sock");
    let mut node =
        node_with_docker(root.path(), &mut guard, &["--docker-socket", missing.to_str().unwrap()])?;
    let service = unique("blind");
    node.cli_json(&["service", "create", &service, "--image", "coyote-test/httpd:1"])?;

    let alarm = wait_until("the docker alarm", TIMEOUT, || open_alarm(&node, "docker/1"))?;
    let message = alarm["message"].as_str().unwrap_or("");
    assert!(message.contains("no-such-docker.sock"), "{message}");
    // Passes later the node keeps running and answering; `plan` explains itself in one line.
    node.wait_two_reconciler_passes()?;
    assert!(node.is_running(), "the node exited:\n{}", node.log_text());
    node.status()?;
    let err = node.cli_err(&["plan"])?;
    assert!(err.contains("Docker is not reachable") && err.lines().count() == 1, "{err}");
    assert_eq!(raised(&node, "docker/1")?, 1, "one alarm, not one per pass");

    // Restarted with the right socket: the container comes up and the alarm clears.
    node.kill9();
    node.flags.clear();
    node.restart()?;
    let cluster = node.cluster_id()?;
    wait_running(&cluster, &service, &spec_hash(&node, &service)?)?;
    wait_until("the docker alarm to clear", TIMEOUT, || {
        Ok(open_alarm(&node, "docker/1")?.is_none().then_some(()))
    })?;
    Ok(())
}

#[test]
fn a_crash_loop_and_a_taken_port_raise_alarms() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let node = node_with_docker(root.path(), &mut guard, &[])?;
    let cluster = node.cluster_id()?;

    // A container that exits a second after each start.
    let crash = unique("crash");
    node.cli_json(&["service", "create", &crash, "--image", "coyote-test/crash:1"])?;

    // A host port that something else holds.
    let holder = std::net::TcpListener::bind("0.0.0.0:0")?;
    let port = holder.local_addr()?.port();
    let web = unique("web");
    node.cli_json(&[
        "service",
        "create",
        &web,
        "--image",
        "coyote-test/httpd:1",
        "--port",
        &format!("{port}:80"),
    ])?;
    let key = format!("port-taken/1/{web}");
    let alarm = wait_until("the port-taken alarm", TIMEOUT, || open_alarm(&node, &key))?;
    assert!(alarm["message"].as_str().unwrap_or("").contains(&port.to_string()), "{alarm}");

    // The port is freed: the next retry starts the container and the alarm clears.
    drop(holder);
    wait_running(&cluster, &web, &spec_hash(&node, &web)?)?;
    wait_until("the port alarm to clear", Duration::from_secs(90), || {
        Ok(open_alarm(&node, &key)?.is_none().then_some(()))
    })?;

    let key = format!("crash-loop/1/{crash}");
    let alarm = wait_until("the crash-loop alarm", Duration::from_secs(90), || open_alarm(&node, &key))?;
    assert!(alarm["message"].as_str().unwrap_or("").contains("Exited (3)"), "{alarm}");
    assert!(node.cli_json_lines(&["alarm", "list"])?.iter().all(|a| a["key"] != "docker/1"));
    if raised(&node, &key)? != 1 {
        bail!("the crash loop was raised more than once");
    }
    Ok(())
}

/// A two-node cluster that manages containers (both voters), and its id.
fn two_nodes_with_docker(root: &std::path::Path, guard: &mut DockerGuard) -> Result<([Node; 2], String)> {
    let n1 = node_with_docker(root, guard, &[])?;
    let cluster = n1.cluster_id()?;
    let mut n2 = Node::new(root, "n2");
    n2.containers = true;
    n2.join(&n1.token(&[])?)?;
    let nodes = [n1, n2];
    wait_until("two voters", TIMEOUT, || {
        let s = nodes[0].status()?;
        let voters = s["members"].as_array().map(|m| m.iter().filter(|m| m["role"] != "learner").count());
        Ok((voters == Some(2)).then_some(()))
    })?;
    Ok((nodes, cluster))
}

/// The container of `service` that node `node` runs or keeps (its `coyote.node` label).
fn container_on(cluster: &str, service: &str, node: u64) -> Result<Option<Value>> {
    Ok(containers(cluster, service)?
        .into_iter()
        .find(|c| c["Config"]["Labels"]["coyote.node"].as_str() == Some(node.to_string().as_str())))
}

#[test]
fn an_instructed_switch_dumps_and_stops_the_old_master_before_the_new_one_starts() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let (nodes, cluster) = two_nodes_with_docker(root.path(), &mut guard)?;

    let service = unique("handover");
    let port = free_port();
    // The image has no /bin/sh: busybox is the shell. The dump leaves a file in the volume.
    let dump = r#"/bin/busybox sh -c "echo dumped > /data/dump.txt""#;
    nodes[0].cli_json(&[
        "service",
        "create",
        &service,
        "--image",
        "coyote-test/httpd:1",
        "--port",
        &format!("{port}:80"),
        "--dump",
        dump,
    ])?;
    let shown = wait_until("a placement", TIMEOUT, || {
        let s = nodes[0].cli_json(&["service", "show", &service])?;
        Ok((!s["placement"].is_null()).then_some(s))
    })?;
    let master = shown["placement"]["master"].as_u64().ok_or_else(|| anyhow!("{shown}"))?;
    let to = shown["placement"]["failover"].as_u64().ok_or_else(|| anyhow!("no failover: {shown}"))?;
    let (old, new) = (&nodes[master as usize - 1], &nodes[to as usize - 1]);
    wait_until("the master's container to run", TIMEOUT, || {
        Ok(container_on(&cluster, &service, master)?.filter(|c| c["State"]["Running"] == true))
    })?;
    assert!(http_get(port)?.contains(" 200 "));
    let standby = container_on(&cluster, &service, to)?.ok_or_else(|| anyhow!("no standby container"))?;
    assert_eq!(standby["State"]["Running"], false, "the failover keeps it stopped");

    // A target without a role is refused, and nothing is asked.
    let err = nodes[0].cli_err(&["service", "switch", &service, "--to", "9"])?;
    assert!(err.contains("node 9 holds no role"), "{err}");

    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    let asked = new.cli_json(&["service", "switch", &service, "--to", &to.to_string()])?;
    assert_eq!(
        (asked["switch"].as_str(), asked["from"].as_u64()),
        (Some("handover"), Some(master)),
        "{asked}"
    );
    let switched = wait_until("the switch", TIMEOUT, || {
        let events = old.cli_json_lines(&["events", "tail", "--kind", "authority_switched"])?;
        Ok(events.into_iter().find(|e| e["outcome"] == "applied"))
    })?;
    // The old master made it, after its dump and stop.
    assert_eq!(switched["actor"], format!("reconciler@node:{master}"), "{switched}");
    assert_eq!(switched["event"]["AuthoritySwitched"]["cause"], "Handover", "{switched}");
    assert!(switched["summary"].as_str().unwrap_or("").contains("dumped and stopped"), "{switched}");
    let requested = old.cli_json_lines(&["events", "tail", "--kind", "handover_requested"])?;
    assert!(requested.iter().any(|e| e["index"].as_u64() < switched["index"].as_u64()), "{requested:?}");
    let dumped = old.dir.join("volumes").join(&service).join("dump.txt");
    assert_eq!(
        std::fs::read_to_string(&dumped)?.trim(),
        "dumped",
        "the dump ran in the old master's container"
    );

    // The new master serves on the same port; the old one's container stays stopped.
    wait_until("the new master's container to run", TIMEOUT, || {
        Ok(runs_on(&cluster, &service, to)?.then_some(()))
    })?;
    wait_until("the service to answer again", TIMEOUT, || {
        Ok(http_get(port).ok().filter(|p| p.contains(" 200 ")))
    })?;
    // The old master's container does not run (as a backup it may even be removed meanwhile), and
    // it died before the new master's started (the engine's own event times).
    assert!(!runs_on(&cluster, &service, master)?);
    let events = life_events(&cluster, &service, since)?;
    let at = |action: &str, node: u64| -> Vec<u128> {
        events.iter().filter(|e| e.1 == action && e.2 == node.to_string()).map(|e| e.0).collect()
    };
    let (died, began) = (at("die", master).into_iter().max(), at("start", to).into_iter().min());
    assert!(
        died.is_some() && began.is_some() && died < began,
        "events since the switch was asked: {events:?}"
    );
    let shown = new.cli_json(&["service", "show", &service])?;
    assert_eq!(shown["placement"]["master"].as_u64(), Some(to), "{shown}");
    drop(nodes);
    Ok(())
}

#[test]
fn an_on_demand_service_running_on_its_master_is_handed_over_too() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let (nodes, cluster) = two_nodes_with_docker(root.path(), &mut guard)?;
    let service = unique("ondemand-handover");
    let port = free_port();
    let dump = r#"/bin/busybox sh -c "echo dumped > /data/dump.txt""#;
    let created = nodes[0].cli_json(&[
        "service",
        "create",
        &service,
        "--image",
        "coyote-test/httpd:1",
        "--port",
        &format!("{port}:80"),
        "--on-demand",
        "--dump",
        dump,
    ])?;
    let master = created["placement"]["master"].as_u64().ok_or_else(|| anyhow!("{created}"))?;
    let to = created["placement"]["failover"].as_u64().ok_or_else(|| anyhow!("no failover: {created}"))?;
    let old = &nodes[master as usize - 1];
    // The first connection starts it on the master, through its activator.
    let first = wait_until("the master's activator to answer", TIMEOUT, || Ok(http_get(port).ok()))?;
    assert!(first.contains(" 200 "), "{first}");
    assert_eq!(container_on(&cluster, &service, master)?.map(|c| c["State"]["Running"] == true), Some(true));

    nodes[0].cli_json(&["service", "switch", &service, "--to", &to.to_string()])?;
    let switched = wait_until("the switch", TIMEOUT, || {
        let events = old.cli_json_lines(&["events", "tail", "--kind", "authority_switched"])?;
        Ok(events.into_iter().find(|e| e["outcome"] == "applied"))
    })?;
    assert_eq!(switched["event"]["AuthoritySwitched"]["cause"], "Handover", "{switched}");
    let dumped = old.dir.join("volumes").join(&service).join("dump.txt");
    assert_eq!(std::fs::read_to_string(&dumped)?.trim(), "dumped", "the dump ran before the handover");
    assert!(!runs_on(&cluster, &service, master)?, "the old master's container is stopped");
    // The new master's activator owns the port now: the next connection starts its container.
    let page = wait_until("the new master to answer", TIMEOUT, || {
        Ok(http_get(port).ok().filter(|p| p.contains(" 200 ")))
    })?;
    assert!(page.contains(" 200 "));
    assert!(runs_on(&cluster, &service, to)?);
    assert!(!runs_on(&cluster, &service, master)?);
    Ok(())
}
