//! The data follows authority, for real: three `coyote` processes running Docker containers. A
//! service's container appends synced sequence numbers to its data directory; its master snapshots
//! it (under `docker pause`) and the failover stores each snapshot. When the master is killed, the
//! failover restores the newest snapshot it can get before its container starts: the restored data
//! ends where that snapshot ends, is never torn, and the container goes on from there.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use coyote_tests::{check_sequence, form_cluster, node_id, test_images, wait_until, DockerGuard, Node};

const TIMEOUT: Duration = Duration::from_secs(60);

fn unique(what: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{what}{}x{nanos}", std::process::id())
}

/// The `seq` file of a snapshot, through `coyote backup export` and GNU tar.
fn exported_seq(node: &Node, service: &str, snapshot: &str, dir: &std::path::Path) -> Result<String> {
    std::fs::create_dir_all(dir)?;
    let tar = dir.join(format!("{}.tar", &snapshot[..12]));
    let out = node.cli(&[
        "backup",
        "export",
        service,
        "--snapshot",
        snapshot,
        "--output",
        &tar.display().to_string(),
    ]);
    if !out.status.success() {
        bail!("backup export failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let listing = std::process::Command::new("tar").arg("-tf").arg(&tar).output()?;
    let names = String::from_utf8_lossy(&listing.stdout).into_owned();
    assert!(names.lines().any(|l| l.trim_start_matches("./") == "seq"), "tar lists {names:?}");
    let into = dir.join(&snapshot[..12]);
    std::fs::create_dir_all(&into)?;
    let status = std::process::Command::new("tar").arg("-xf").arg(&tar).arg("-C").arg(&into).status()?;
    assert!(status.success(), "tar -x failed");
    Ok(std::fs::read_to_string(into.join("seq"))?)
}

#[test]
fn a_failover_restores_the_newest_snapshot_before_its_container_starts() -> Result<()> {
    test_images()?;
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let service = unique("seq");
    let (mut nodes, ids, m, f) = cluster_with_service(root.path(), &mut guard, &service, "1s")?;
    let (master, failover) = (ids[m], ids[f]);

    // The master restores nothing (a new service), starts the container, and snapshots it every
    // second; the failover stores the snapshots. Wait for a few, with data in them.
    let stored = wait_until("the failover to store a snapshot with data", TIMEOUT, || {
        let list = nodes[f].cli_json(&["backup", "list", &service])?;
        let held = list["snapshots"].as_array().into_iter().flatten().find(|s| {
            s["holders"].as_array().is_some_and(|h| h.iter().any(|n| n.as_u64() == Some(failover)))
                && s["bytes"].as_u64().unwrap_or(0) > 200
        });
        Ok(held.cloned())
    })?;
    assert_eq!(stored["consistency"], "paused", "a running container is paused: {stored}");
    assert_eq!(stored["taken_by"].as_u64(), Some(master));

    // Every snapshot of a running container is crash-consistent: an exported one is a clean prefix.
    let exports = root.path().join("exports");
    let first = stored["snapshot"].as_str().context("an id")?.to_string();
    let seq = exported_seq(&nodes[f], &service, &first, &exports)?;
    let first_last = check_sequence(&seq, "an exported snapshot")?;
    assert!(first_last > 0);

    // The failover keeps the newest snapshot it holds restored, ready to be renamed into place.
    let ready_copies = |node: &Node| -> Vec<String> {
        let prefix = format!(".{service}.ready-");
        std::fs::read_dir(node.dir.join("volumes"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_string_lossy().strip_prefix(&prefix).map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let ready = wait_until("the failover to keep a ready copy", TIMEOUT, || {
        let ready = ready_copies(&nodes[f]);
        Ok((!ready.is_empty()).then_some(ready))
    })?;
    let ready_seq = std::fs::read_to_string(
        nodes[f].dir.join("volumes").join(format!(".{service}.ready-{}", ready[0])).join("seq"),
    )
    .unwrap_or_default();
    check_sequence(&ready_seq, "the ready copy")?;
    assert!(ready_copies(&nodes[m]).is_empty(), "only the failover keeps one");

    // The master dies (its node process; its container is removed with the test's cluster).
    nodes[m].kill9();
    let killed = std::time::Instant::now();
    let restored = wait_until("the failover to restore and take over", TIMEOUT, || {
        let list = nodes[f].cli_json(&["backup", "list", &service])?;
        Ok((list["master"].as_u64() == Some(failover) && !list["restored"].is_null()).then_some(list))
    });
    let restored = match restored {
        Ok(r) => r,
        Err(e) => {
            for ev in nodes[f].events().unwrap_or_default().iter().rev().take(15) {
                eprintln!("{}", ev["summary"]);
            }
            eprintln!("{}", nodes[f].log_text().lines().rev().take(30).collect::<Vec<_>>().join("\n"));
            return Err(e);
        }
    };
    eprintln!("restored {:?} after the kill: {}", killed.elapsed(), restored["restored"]);
    let snapshot = restored["restored"]["snapshot"].as_str().context("a snapshot was restored")?.to_string();
    let record = restored["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["snapshot"] == snapshot.as_str())
        .cloned()
        .context("the restored snapshot is in the ledger")?;
    assert!(
        record["holders"].as_array().is_some_and(|h| h.iter().any(|n| n.as_u64() == Some(failover))),
        "the new master holds what it restored: {record}"
    );
    // The snapshot restored is the newest the failover held, or a newer one.
    assert!(record["taken_at_ms"].as_u64() >= stored["taken_at_ms"].as_u64(), "{record} older than {stored}");
    let restored_seq = exported_seq(&nodes[f], &service, &snapshot, &exports)?;
    let restored_last = check_sequence(&restored_seq, "the restored snapshot")?;
    assert!(restored_last >= first_last);

    // The container starts on the restored data and goes on from its last number: the live file is
    // the snapshot's sequence, continued, with no restart from 1 and nothing torn.
    let volume = nodes[f].dir.join("volumes").join(&service).join("seq");
    let live_last = wait_until("the new master's container to go on writing", TIMEOUT, || {
        let Ok(text) = std::fs::read_to_string(&volume) else { return Ok(None) };
        let last = check_sequence(&text, "the new master's data")?;
        Ok((last > restored_last + 5).then_some(last))
    })?;
    let live = std::fs::read_to_string(&volume)?;
    assert!(live.starts_with(&restored_seq), "the live data begins with the restored snapshot");
    eprintln!("restored up to {restored_last}, the new master wrote on to {live_last}");

    assert!(
        ready_copies(&nodes[f]).is_empty(),
        "the ready copy was used or dropped: {:?}",
        ready_copies(&nodes[f])
    );
    // What the failover's directory held before is moved aside, not deleted.
    let aside = std::fs::read_dir(nodes[f].dir.join("volumes"))?
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with(&format!("{service}.stale-")));
    assert!(aside, "the old directory is kept aside");

    for n in &mut nodes {
        n.kill9();
    }
    guard.clean();
    Ok(())
}

/// Three nodes snapshotting every `backup_every` and a `coyote-test/seq:1` service; returns them,
/// their ids, and the service's master and failover positions.
fn cluster_with_service(
    root: &std::path::Path,
    guard: &mut DockerGuard,
    service: &str,
    backup_every: &str,
) -> Result<(Vec<Node>, Vec<u64>, usize, usize)> {
    let nodes = ["127.0.0.1", "127.0.0.2", "127.0.0.3"].iter().enumerate().map(|(i, ip)| {
        let mut n = Node::on_ip(root, &format!("n{}", i + 1), ip);
        n.containers = true;
        n.flags = vec!["--backup-every".into(), backup_every.into(), "--forward".into(), "userspace".into()];
        n
    });
    let nodes = form_cluster(guard, nodes.collect())?;
    let ids: Vec<u64> = nodes.iter().map(node_id).collect::<Result<_>>()?;
    let created = nodes[0].cli_json(&["service", "create", service, "--image", "coyote-test/seq:1"])?;
    let master = created["placement"]["master"].as_u64().context("a master")?;
    let failover = created["placement"]["failover"].as_u64().context("a failover")?;
    let m = ids.iter().position(|i| *i == master).context("master")?;
    let f = ids.iter().position(|i| *i == failover).context("failover")?;
    Ok((nodes, ids, m, f))
}

#[test]
fn a_handover_loses_nothing_the_container_wrote() -> Result<()> {
    test_images()?;
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let service = unique("handover");
    let (mut nodes, ids, m, f) = cluster_with_service(root.path(), &mut guard, &service, "1s")?;
    let old_volume = nodes[m].dir.join("volumes").join(&service).join("seq");
    wait_until("the master's container to write", TIMEOUT, || {
        let text = std::fs::read_to_string(&old_volume).unwrap_or_default();
        Ok((text.lines().count() > 10).then_some(()))
    })?;

    // A graceful handover to the failover, while the container writes every 50 ms.
    nodes[m].cli_json(&["service", "switch", &service, "--to", &ids[f].to_string()])?;
    let new_volume = nodes[f].dir.join("volumes").join(&service).join("seq");
    let old_last = wait_until("the switch", TIMEOUT, || {
        let show = nodes[f].cli_json(&["service", "show", &service])?;
        Ok((show["placement"]["master"].as_u64() == Some(ids[f])).then_some(()))
    })
    .and_then(|()| {
        // The old master's container is stopped: its file is final.
        let old = std::fs::read_to_string(&old_volume)?;
        check_sequence(&old, "the old master's data")
    })?;
    let new_last = wait_until("the new master's container to write", TIMEOUT, || {
        let Ok(text) = std::fs::read_to_string(&new_volume) else { return Ok(None) };
        let last = check_sequence(&text, "the new master's data")?;
        Ok((last > old_last + 3).then_some(last))
    })?;
    // Consecutive from 1 through the old master's last number and on: the last write before the
    // stop is the first thing the new master's container read (it went on at old_last + 1).
    let old = std::fs::read_to_string(&old_volume)?;
    let new = std::fs::read_to_string(&new_volume)?;
    assert!(new.starts_with(&old), "the new master's data begins with everything the old master wrote");
    eprintln!("the old master wrote up to {old_last}; the new master went on to {new_last}");
    // What the new master restored was read with the old container stopped (the handover's last
    // snapshot, or a periodic one taken after the stop with the same content).
    let list = nodes[f].cli_json(&["backup", "list", &service])?;
    let restored = list["restored"]["snapshot"].as_str().context("a restore from a snapshot")?;
    let record = list["snapshots"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["snapshot"] == restored)
        .context("the restored snapshot is in the ledger")?;
    assert_eq!(record["consistency"], "stopped", "{record}");

    for n in &mut nodes {
        n.kill9();
    }
    guard.clean();
    Ok(())
}

#[test]
fn a_corrupt_chunk_is_found_fetched_again_and_recorded() -> Result<()> {
    test_images()?;
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let service = unique("verify");
    // No periodic snapshots: the failover's store holds exactly the one taken here.
    let (mut nodes, ids, m, f) = cluster_with_service(root.path(), &mut guard, &service, "0")?;
    let volume = nodes[m].dir.join("volumes").join(&service).join("seq");
    wait_until("the master's container to write", TIMEOUT, || {
        Ok((std::fs::read_to_string(&volume).unwrap_or_default().lines().count() > 5).then_some(()))
    })?;
    let taken = nodes[m].cli_json(&["backup", "now", &service])?;
    assert_eq!(taken["recorded"], true, "{taken}");
    assert_eq!(taken["consistency"], "paused", "{taken}");
    let snapshot = taken["snapshot"].as_str().context("an id")?.to_string();
    wait_until("the failover to store it", TIMEOUT, || {
        let list = nodes[f].cli_json(&["backup", "list", &service])?;
        let held = list["snapshots"].as_array().into_iter().flatten().any(|s| {
            s["snapshot"] == snapshot.as_str()
                && s["holders"].as_array().is_some_and(|h| h.iter().any(|n| n.as_u64() == Some(ids[f])))
        });
        Ok(held.then_some(()))
    })?;
    let status = nodes[f].cli_json(&["status"])?;
    let data = status["services"].as_array().into_iter().flatten().find(|d| d["service"] == service.as_str());
    assert!(data.is_some_and(|d| d["data_age_ms"].is_u64()), "status shows the data age: {status}");

    // Flip a byte in the middle of the largest chunk the failover holds.
    let mut chunks: Vec<std::path::PathBuf> = Vec::new();
    for fan in std::fs::read_dir(nodes[f].dir.join("backups").join("chunks"))? {
        for chunk in std::fs::read_dir(fan?.path())? {
            chunks.push(chunk?.path());
        }
    }
    chunks.sort_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    let victim = chunks.last().context("the failover holds chunks")?;
    let mut bytes = std::fs::read(victim)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(victim, &bytes)?;

    let verified = nodes[f].cli_json(&["backup", "verify", &service])?;
    assert_eq!(verified["corrupt_chunks"].as_u64(), Some(1), "{verified}");
    assert_eq!(verified["repaired"], serde_json::json!([snapshot]), "{verified}");
    let kinds: Vec<String> = nodes[f]
        .events()?
        .iter()
        .filter(|e| e["outcome"] == "applied")
        .filter_map(|e| e["kind"].as_str().map(String::from))
        .filter(|k| k == "snapshot_corrupt" || k == "snapshot_stored")
        .collect();
    assert!(kinds.ends_with(&["snapshot_corrupt".into(), "snapshot_stored".into()]), "{kinds:?}");
    let again = nodes[f].cli_json(&["backup", "verify"])?;
    assert_eq!(again["corrupt_chunks"].as_u64(), Some(0), "{again}");

    // The repaired snapshot restores into a new directory, a clean sequence.
    let into = root.path().join("copy");
    let restored = nodes[f].cli_json(&[
        "backup",
        "restore",
        &service,
        "--snapshot",
        &snapshot,
        "--into",
        &into.display().to_string(),
    ])?;
    assert!(restored["files"].as_u64() >= Some(1), "{restored}");
    let last = check_sequence(&std::fs::read_to_string(into.join("seq"))?, "the restored copy")?;
    assert!(last > 5);
    let refused =
        nodes[f].cli_err(&["backup", "restore", &service, "--into", &into.display().to_string()])?;
    assert!(refused.contains("exists"), "{refused}");

    // With a dump command: `backup now --dump` runs it in the container and snapshots without a
    // pause; the snapshot holds what the dump wrote.
    let dump = "/bin/busybox sh -c 'cp /data/seq /data/seq.dump'";
    nodes[m].cli_json(&["service", "update", &service, "--dump", dump])?;
    let dumped = nodes[m].cli_json(&["backup", "now", &service, "--dump"])?;
    assert_eq!(dumped["consistency"], "dumped", "{dumped}");
    assert_eq!(dumped["paused_ms"], 0, "{dumped}");
    let id = dumped["snapshot"].as_str().context("an id")?.to_string();
    let copy = root.path().join("dumped");
    nodes[m].cli_json(&[
        "backup",
        "restore",
        &service,
        "--snapshot",
        &id,
        "--into",
        &copy.display().to_string(),
    ])?;
    check_sequence(&std::fs::read_to_string(copy.join("seq.dump"))?, "the dump")?;

    for n in &mut nodes {
        n.kill9();
    }
    guard.clean();
    Ok(())
}

/// The disk of a backup node fills up: its copy of a snapshot fails with `BackupFailed` naming the
/// full disk, nothing half-written stays in its store, and the failover stores the snapshot all the
/// same. The backup node's store is a small tmpfs (root needed, as for `full_disk`).
#[test]
fn disk_full_on_a_backup_node_fails_its_copy_alone() -> Result<()> {
    test_images()?;
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let service = unique("diskfull");
    let (mut nodes, ids, m, f) = cluster_with_service(root.path(), &mut guard, &service, "0")?;
    let b = 3 - m - f;
    // The backup node's store on a 1 MiB disk, with no reserve: the disk itself fills up.
    nodes[b].terminate(Duration::from_secs(10));
    let store = nodes[b].dir.join("backups");
    std::fs::remove_dir_all(&store)?;
    std::fs::create_dir(&store)?;
    let disk = coyote_tests::SmallDisk::mount_at(&store, "1M")?;
    nodes[b].flags.extend(["--backup-reserve".into(), "0".into()]);
    nodes[b].restart()?;

    // 3 MiB that do not compress, in the master's volume, and a snapshot of it.
    let volume = nodes[m].dir.join("volumes").join(&service);
    wait_until("the master's container to write", TIMEOUT, || {
        Ok((std::fs::read_to_string(volume.join("seq")).unwrap_or_default().lines().count() > 3)
            .then_some(()))
    })?;
    std::fs::write(volume.join("noise"), noise(3 << 20, 0x9e37_79b9_7f4a_7c15))?;
    let taken = nodes[m].cli_json(&["backup", "now", &service])?;
    let snapshot = taken["snapshot"].as_str().context("an id")?.to_string();

    let failure = wait_until("the backup node to report its failure", TIMEOUT, || {
        let failed = nodes[m].events()?.into_iter().find(|e| {
            e["kind"] == "backup_failed"
                && e["outcome"] == "applied"
                && e["event"]["BackupFailed"]["node"].as_u64() == Some(ids[b])
        });
        Ok(failed)
    })?;
    let reason = failure["event"]["BackupFailed"]["reason"].as_str().unwrap_or_default().to_lowercase();
    assert!(reason.contains("space") || reason.contains("full"), "the reason names the full disk: {failure}");
    eprintln!("the backup node reported: {reason}");
    wait_until("the failover to store the snapshot all the same", TIMEOUT, || {
        let list = nodes[m].cli_json(&["backup", "list", &service])?;
        let record =
            list["snapshots"].as_array().into_iter().flatten().find(|s| s["snapshot"] == snapshot.as_str());
        let holders: Vec<u64> = record
            .and_then(|r| r["holders"].as_array())
            .map(|h| h.iter().filter_map(|n| n.as_u64()).collect())
            .unwrap_or_default();
        assert!(!holders.contains(&ids[b]), "the backup node does not count as a holder: {holders:?}");
        Ok(holders.contains(&ids[f]).then_some(()))
    })?;
    // Nothing half-written: the store's temporary directory is empty, and every chunk it kept is
    // whole (backup verify re-hashes each).
    let leftovers: Vec<_> = std::fs::read_dir(store.join("tmp"))?.collect();
    assert!(leftovers.is_empty(), "no partial chunk is left: {leftovers:?}");
    let verified = nodes[b].cli_json(&["backup", "verify"])?;
    assert_eq!(verified["corrupt_chunks"].as_u64(), Some(0), "{verified}");

    for n in &mut nodes {
        n.kill9();
    }
    drop(disk);
    guard.clean();
    Ok(())
}

/// `len` bytes that do not compress (xorshift from `seed`).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Counts the chunk files in a node's store.
fn chunk_count(node: &Node) -> usize {
    let Ok(fans) = std::fs::read_dir(node.dir.join("backups").join("chunks")) else { return 0 };
    fans.filter_map(|f| f.ok()).filter_map(|f| std::fs::read_dir(f.path()).ok()).map(|d| d.count()).sum()
}

/// The master dies while the failover is fetching its newest snapshot: the failover restores the
/// last snapshot it holds whole (none of the half-fetched one: no file of it appears), leaves no
/// partial chunk behind, and its container goes on from that snapshot's data.
#[test]
fn a_master_killed_mid_transfer_leaves_the_failover_its_last_whole_snapshot() -> Result<()> {
    test_images()?;
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let service = unique("midway");
    let (mut nodes, ids, m, f) = cluster_with_service(root.path(), &mut guard, &service, "0")?;
    let volume = nodes[m].dir.join("volumes").join(&service);
    wait_until("the master's container to write", TIMEOUT, || {
        Ok((std::fs::read_to_string(volume.join("seq")).unwrap_or_default().lines().count() > 3)
            .then_some(()))
    })?;
    let first = nodes[m].cli_json(&["backup", "now", &service])?;
    let first = first["snapshot"].as_str().context("an id")?.to_string();
    let held_by = |node: &Node, snapshot: &str, holder: u64| -> Result<bool> {
        let list = node.cli_json(&["backup", "list", &service])?;
        Ok(list["snapshots"].as_array().into_iter().flatten().any(|s| {
            s["snapshot"] == snapshot
                && s["holders"].as_array().is_some_and(|h| h.iter().any(|n| n.as_u64() == Some(holder)))
        }))
    };
    wait_until("the failover to store the first snapshot", TIMEOUT, || {
        Ok(held_by(&nodes[f], &first, ids[f])?.then_some(()))
    })?;

    // 128 MiB that do not compress: a transfer of many chunks, each synced on arrival.
    std::fs::write(volume.join("noise"), noise(128 << 20, 0x2545_f491_4f6c_dd1d))?;
    let before = chunk_count(&nodes[f]);
    let second = nodes[m].cli_json(&["backup", "now", &service])?;
    let second = second["snapshot"].as_str().context("an id")?.to_string();
    let midway = wait_until("the failover to be fetching the second snapshot", TIMEOUT, || {
        let now = chunk_count(&nodes[f]);
        Ok((now > before + 2).then_some(now))
    })?;
    nodes[m].kill9();
    assert!(!held_by(&nodes[f], &second, ids[f])?, "the kill came before the transfer ended");
    eprintln!(
        "the master was killed with {} of the second snapshot's chunks at the failover",
        midway - before
    );

    let restored = wait_until("the failover to restore and take over", TIMEOUT, || {
        let list = nodes[f].cli_json(&["backup", "list", &service])?;
        Ok((list["master"].as_u64() == Some(ids[f]) && !list["restored"].is_null()).then_some(list))
    })?;
    let snapshot = restored["restored"]["snapshot"].as_str().context("a snapshot was restored")?;
    let record =
        restored["snapshots"].as_array().into_iter().flatten().find(|s| s["snapshot"] == second.as_str());
    let second_elsewhere = record
        .and_then(|r| r["holders"].as_array())
        .is_some_and(|h| h.iter().any(|n| n.as_u64() != Some(ids[m])));
    if second_elsewhere {
        // The backup node finished its copy before the kill: that one is the newest held.
        assert_eq!(snapshot, second, "the newest snapshot a live node holds");
    } else {
        assert_eq!(snapshot, first, "the last snapshot the failover held whole");
        let new_volume = nodes[f].dir.join("volumes").join(&service);
        assert!(!new_volume.join("noise").exists(), "nothing of the half-fetched snapshot");
    }
    let seq = nodes[f].dir.join("volumes").join(&service).join("seq");
    wait_until("the new master's container to go on writing", TIMEOUT, || {
        let Ok(text) = std::fs::read_to_string(&seq) else { return Ok(None) };
        let last = check_sequence(&text, "the new master's data")?;
        Ok((last > 10).then_some(()))
    })?;
    let leftovers: Vec<_> = std::fs::read_dir(nodes[f].dir.join("backups").join("tmp"))?.collect();
    assert!(leftovers.is_empty(), "no partial chunk is left: {leftovers:?}");
    let verified = nodes[f].cli_json(&["backup", "verify"])?;
    assert_eq!(verified["corrupt_chunks"].as_u64(), Some(0), "{verified}");

    for n in &mut nodes {
        n.kill9();
    }
    guard.clean();
    Ok(())
}

/// `backup restore SERVICE --snapshot ID` without `--into`: the service's data goes back to the
/// snapshot in place. The master stops the container, moves the data aside, restores, and starts
/// it again on the snapshot's data; the data it replaced is kept; the restored data is snapshotted
/// at once (so a failover would not bring the discarded data back).
#[test]
fn a_rollback_in_place_restarts_the_service_on_the_snapshot() -> Result<()> {
    test_images()?;
    let root = tempfile::tempdir()?;
    let mut guard = DockerGuard::default();
    let service = unique("rollback");
    let (mut nodes, _ids, m, f) = cluster_with_service(root.path(), &mut guard, &service, "0")?;
    let volume = nodes[m].dir.join("volumes").join(&service);
    wait_until("the master's container to write", TIMEOUT, || {
        Ok((std::fs::read_to_string(volume.join("seq")).unwrap_or_default().lines().count() > 5)
            .then_some(()))
    })?;
    let taken = nodes[m].cli_json(&["backup", "now", &service])?;
    let snapshot = taken["snapshot"].as_str().context("an id")?.to_string();
    let exports = root.path().join("exports");
    let at_snapshot = exported_seq(&nodes[m], &service, &snapshot, &exports)?;
    let snapshot_last = check_sequence(&at_snapshot, "the snapshot")?;
    let later = wait_until("the container to write on", TIMEOUT, || {
        let text = std::fs::read_to_string(volume.join("seq")).unwrap_or_default();
        let last = check_sequence(&text, "the live data")?;
        Ok((last > snapshot_last + 10).then_some(last))
    })?;

    // Asked through another node: the rollback is an event; the CLI waits for the restore.
    let rolled = nodes[f].cli_json(&["backup", "restore", &service, "--snapshot", &snapshot[..12]])?;
    let epoch = rolled["epoch"].as_u64().context("an epoch")?;
    assert_eq!(rolled["restored"]["snapshot"], snapshot.as_str(), "{rolled}");
    let live_last = wait_until("the container to write on from the snapshot", TIMEOUT, || {
        let Ok(text) = std::fs::read_to_string(volume.join("seq")) else { return Ok(None) };
        let last = check_sequence(&text, "the rolled-back data")?;
        Ok((text.starts_with(&at_snapshot) && last > snapshot_last + 3).then_some(last))
    })?;
    eprintln!(
        "snapshot at {snapshot_last}, written on to {later}, rolled back and written on to {live_last}"
    );
    let aside = nodes[m].dir.join("volumes").join(format!("{service}.stale-{epoch}")).join("seq");
    let replaced = check_sequence(&std::fs::read_to_string(&aside)?, "the replaced data")?;
    assert!(replaced >= later, "the data it replaced is kept aside, whole");
    let list = nodes[m].cli_json(&["backup", "list", &service])?;
    let after =
        list["snapshots"].as_array().into_iter().flatten().any(|s| s["epoch"].as_u64() == Some(epoch));
    assert!(after, "the rolled-back data was snapshotted at the new epoch: {list}");
    let refused = nodes[m].cli_err(&["backup", "restore", &service, "--snapshot", "ffffffffffff"])?;
    assert!(refused.contains("no single snapshot"), "{refused}");

    // The service's own retention: the newest two (and the newest each role holder holds).
    let refused = nodes[m].cli_err(&["service", "update", &service, "--keep", "last=0"])?;
    assert!(refused.contains("at least the newest"), "{refused}");
    nodes[m].cli_json(&["service", "update", &service, "--keep", "last=2,hourly=0,daily=0,weekly=0"])?;
    let shown = nodes[f].cli_json(&["service", "show", &service])?;
    assert_eq!(shown["spec"]["keep"]["last"], 2, "{shown}");
    let mut newest = String::new();
    for _ in 0..3 {
        let taken = nodes[m].cli_json(&["backup", "now", &service])?;
        newest = taken["snapshot"].as_str().context("an id")?.to_string();
    }
    let list = nodes[m].cli_json(&["backup", "list", &service])?;
    let ids: Vec<&str> =
        list["snapshots"].as_array().into_iter().flatten().filter_map(|s| s["snapshot"].as_str()).collect();
    assert!(ids.contains(&newest.as_str()) && !ids.contains(&snapshot.as_str()), "{list}");
    assert!(ids.len() <= 2 + 3, "the newest two and each holder's newest: {list}");

    for n in &mut nodes {
        n.kill9();
    }
    guard.clean();
    Ok(())
}
