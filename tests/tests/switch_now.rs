//! `coyote service switch --now` between two real processes, many times in a row: the moment the new
//! master may serve is derived from the envelope's own clock reading, so no switch is refused for a
//! millisecond that passed between two readings of the clock.

use anyhow::{ensure, Result};
use coyote_tests::{cluster, wait_until};
use serde_json::json;
use std::time::Duration;

/// Switches in the loop (`COYOTE_SWITCH_ROUNDS` overrides).
const ROUNDS: usize = 1000;

#[test]
fn switch_now_succeeds_every_time() -> Result<()> {
    let rounds = std::env::var("COYOTE_SWITCH_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(ROUNDS);
    let root = tempfile::tempdir()?;
    let nodes = cluster(root.path(), 2)?;
    let created = nodes[0].cli_json(&["service", "create", "flip", "--image", "none:1"])?;
    let mut master = created["placement"]["master"].as_u64().expect("placed on creation");
    ensure!(created["placement"]["failover"].as_u64().is_some(), "no failover: {created}");

    let mut failures = Vec::new();
    for round in 0..rounds {
        let to = if master == 1 { 2 } else { 1 };
        // Asked through each process in turn: one is the leader, the other forwards to it.
        let via = &nodes[round % 2];
        let body = json!({ "to": to, "now": true }).to_string();
        let (code, answer) = via.api("POST", "/v1/services/flip/switch", &body)?;
        if code == 200 {
            ensure!(answer["to"] == to && answer["switch"] == "now", "round {round}: {answer}");
            master = to;
        } else {
            failures.push(format!("round {round}: {code} {answer}"));
        }
    }
    ensure!(failures.is_empty(), "{} of {rounds} switches failed, first: {}", failures.len(), failures[0]);

    // Both replicas agree on where authority ended.
    for node in &nodes {
        wait_until("the replicas to agree", Duration::from_secs(10), || {
            let s = node.cli_json(&["service", "show", "flip"])?;
            Ok((s["placement"]["master"].as_u64() == Some(master)).then_some(()))
        })?;
    }
    Ok(())
}
