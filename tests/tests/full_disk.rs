//! A full disk under a node's data directory: writes are refused with a clear error before the disk
//! is full, the node keeps running and serving reads, and nothing acknowledged is lost. When the disk
//! does fill up to the last byte (reserve off), the node stops with a clear message instead of
//! running on without a log, and after space is freed it restarts with every acknowledged event.
//!
//! The disk is a small tmpfs mounted for the test, which needs root: the test fails without it
//! rather than pass having tested nothing (the test command, `scripts/test.sh`, runs as root, as CI
//! does; the activator's tests need root for nftables too). To run the rest of the suite as another
//! user, leave this test out: `cargo nextest run -E 'not binary(full_disk)'`.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use coyote_tests::{Node, SmallDisk};

fn raise(node: &Node, key: &str) -> Result<(u16, serde_json::Value)> {
    let body = serde_json::json!({ "key": key, "message": "x".repeat(2000) }).to_string();
    node.api("POST", "/v1/alarms", &body)
}

/// Every acknowledged alarm is in the history at the index it was acknowledged with.
fn check_history(node: &Node, acknowledged: &BTreeMap<u64, String>) -> Result<()> {
    let events = node.events()?;
    let by_index: BTreeMap<u64, String> =
        events.iter().map(|e| (e["index"].as_u64().unwrap_or(0), e.to_string())).collect();
    for (index, key) in acknowledged {
        match by_index.get(index) {
            Some(e) if e.contains(key.as_str()) => {}
            other => bail!("acknowledged alarm {key} at {index} is not there: {other:?}"),
        }
    }
    Ok(())
}

#[test]
fn a_full_disk_refuses_writes_with_a_clear_error_and_loses_nothing() -> Result<()> {
    let root = tempfile::tempdir()?;
    let disk = SmallDisk::mount(root.path(), "24m")?;
    let mut node = Node::new(root.path(), "n1");
    node.dir = disk.path.join("n1");
    node.flags = vec!["--disk-reserve".into(), "6M".into()];
    node.up()?;

    let mut acknowledged = BTreeMap::new();
    for i in 0..10 {
        let key = format!("before-{i}");
        let (code, v) = raise(&node, &key)?;
        anyhow::ensure!(code == 200, "write {i}: {code} {v}");
        acknowledged.insert(v["index"].as_u64().context("index")?, key);
    }

    // Below the reserve: refused with a clear error, nothing written, the node still answers.
    let filler = disk.fill(3 << 20)?;
    let events_before = node.events()?.len();
    let (code, v) = raise(&node, "refused")?;
    assert_eq!(code, 507, "{v}");
    let message = v["error"].as_str().unwrap_or_default();
    assert!(message.contains("free on the disk") && message.contains("reserve is 6 MiB"), "{message}");
    let stderr = node.cli_err(&["token", "create"])?;
    assert!(stderr.contains("free some space"), "{stderr}");
    assert_eq!(node.events()?.len(), events_before, "a refused write wrote nothing");
    assert!(node.is_running());
    check_history(&node, &acknowledged)?;

    // Space freed: writes are accepted again.
    std::fs::remove_file(&filler)?;
    let (code, v) = raise(&node, "after-freeing")?;
    assert_eq!(code, 200, "{v}");
    acknowledged.insert(v["index"].as_u64().context("index")?, "after-freeing".into());

    // Reserve off, disk filled to the last byte: the node stops with a clear message, no panic.
    node.kill9();
    node.flags = vec!["--disk-reserve".into(), "0".into()];
    node.restart()?;
    let filler = disk.fill(0)?;
    let mut refused = None;
    for i in 0..2000 {
        let key = format!("filling-{i}");
        match raise(&node, &key) {
            Ok((200, v)) => {
                acknowledged.insert(v["index"].as_u64().context("index")?, key);
            }
            Ok((code, v)) => {
                refused = Some(format!("{code} {v}"));
                break;
            }
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    let refused = refused.ok_or_else(|| anyhow!("2000 writes fitted on a full disk"))?;
    assert!(refused.contains("No space left on device") || refused.contains("connect"), "{refused}");
    let status = node.wait_exit(Duration::from_secs(20))?;
    assert_eq!(status.code(), Some(1), "the node exits with an error, not a crash: {status}");
    let log = node.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("the log stopped") && log.contains("free space under"), "{log}");

    // Space freed: the node starts again with every acknowledged event.
    std::fs::remove_file(&filler)?;
    node.restart()?;
    check_history(&node, &acknowledged)?;
    let (code, v) = raise(&node, "after-restart")?;
    assert_eq!(code, 200, "{v}");
    Ok(())
}
