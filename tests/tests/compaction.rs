//! Log compaction: after snapshots purge the log, the whole event history is still shown by
//! `events tail`, on old members and on a server that joined after the compaction (it receives the
//! snapshot, which carries the archive of applied events).

use std::time::Duration;

use anyhow::Result;
use coyote_tests::{event_keys, wait_until, Node};

#[test]
fn history_survives_compaction_and_reaches_late_joiners() -> Result<()> {
    let root = tempfile::tempdir()?;
    let compact = ["--snapshot-every", "20", "--keep-logs", "5"].map(String::from).to_vec();
    let mut a = Node::new(root.path(), "a");
    a.flags = compact.clone();
    a.up()?;
    let token = a.token(&["--uses", "2"])?;
    let mut b = Node::new(root.path(), "b");
    b.flags = compact.clone();
    b.join(&token)?;

    for i in 0..60 {
        let (code, v) = a.api("POST", "/v1/alarms", &format!(r#"{{"key":"k{i}","message":"m{i}"}}"#))?;
        assert_eq!(code, 200, "{v}");
        let id = v["id"].as_u64().unwrap();
        let (code, v) = a.api("POST", &format!("/v1/alarms/{id}/clear"), "")?;
        assert_eq!(code, 200, "{v}");
    }
    let status = wait_until("a snapshot that purged the log", Duration::from_secs(20), || {
        let s = a.status()?;
        Ok(s["purged_index"].as_u64().is_some_and(|p| p > 20).then_some(s))
    })?;
    eprintln!("leader status after compaction: {status}");

    let mut c = Node::new(root.path(), "c");
    c.flags = compact;
    c.join(&token)?;
    let reference = event_keys(&a.events()?);
    assert!(reference.len() > 120, "history too short: {}", reference.len());
    assert_eq!(reference[0].1, "cluster_created");
    wait_until("every node to show the whole history", Duration::from_secs(20), || {
        let b_events = event_keys(&b.events()?);
        let c_events = event_keys(&c.events()?);
        Ok((b_events == reference
            && c_events[..reference.len().min(c_events.len())] == reference[..]
            && c_events.len() >= reference.len())
        .then_some(()))
    })?;

    // After a restart the node starts from its snapshot and still shows everything.
    c.kill9();
    c.restart()?;
    // It may still be catching up with the leader right after its restart.
    let after = wait_until("the restarted node to show the whole history", Duration::from_secs(20), || {
        let after = event_keys(&c.events()?);
        Ok((after.len() >= reference.len()).then_some(after))
    })?;
    assert_eq!(&after[..reference.len()], &reference[..]);
    Ok(())
}
