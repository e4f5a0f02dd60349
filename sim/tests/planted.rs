//! The proofs that the checkers check: each planted bug, switched on, must make the simulator report
//! the violation that names it, within the seeds CI runs (the random schedule's first seeds, or the
//! scenario that was written for the bug). A checker that stops checking fails here.
//!
//! Built only with `--features planted-bugs` (`scripts/test.sh` runs it so). The bugs are switched
//! on and off process-wide, so one test plays them one after the other.

#![cfg(feature = "planted-bugs")]

use coyote_sim::{run_seed, Params, Scenario};

/// Seeds tried per bug, at most; each run stops at its first violation.
const SEEDS_MAX: u64 = 8;

struct Planted {
    name: &'static str,
    switch: fn(bool),
    scenario: Option<Scenario>,
    /// A piece of the violation the checker that catches the bug reports.
    reported: &'static str,
}

fn catch(bug: &Planted) -> Result<(u64, String), String> {
    (bug.switch)(true);
    let params = Params { scenario: bug.scenario, ..Params::default() };
    let mut seen = Vec::new();
    let found = (0..SEEDS_MAX).find_map(|seed| {
        let report = run_seed(seed, &params);
        let caught = report.violations.iter().find(|v| v.contains(bug.reported)).cloned();
        seen.extend(report.violations);
        caught.map(|v| (seed, v))
    });
    (bug.switch)(false);
    found.ok_or_else(|| {
        format!(
            "planted bug {} was not reported as {:?} in seeds 0..{SEEDS_MAX}; violations seen: {seen:?}",
            bug.name, bug.reported
        )
    })
}

#[test]
fn every_planted_bug_is_caught() {
    let bugs = [
        Planted {
            name: "keep-conflicting-entries",
            switch: coyote_log::store::planted::keep_conflicting_entries,
            scenario: None,
            reported: "prefix:",
        },
        Planted {
            name: "backup-takes-over",
            switch: coyote_nodes::monitor::planted::backup_takes_over_by_itself,
            scenario: None,
            reported: "without an instruction",
        },
        Planted {
            name: "failover-ignores-votes",
            switch: coyote_state_machine::planted::failover_ignores_votes_on,
            scenario: None,
            reported: "could reach each other all along",
        },
        Planted {
            name: "stale-leader-confirms",
            switch: coyote_log::store::planted::confirm_from_stale_acks,
            scenario: Some(Scenario::IsolatedLeaderConfirms),
            reported: "confirmed its leadership with a quorum",
        },
        Planted {
            name: "placement-moves-master",
            switch: coyote_state_machine::planted::placement_moves_master_on,
            scenario: Some(Scenario::StalePlacement),
            reported: "without a switch",
        },
        Planted {
            name: "activator-ignores-fence",
            switch: coyote_nodes::activator::planted::ignore_fence,
            scenario: None,
            reported: "while not serving it",
        },
        Planted {
            name: "proxy-ignores-fence",
            switch: coyote_nodes::front::planted::ignore_fence,
            scenario: None,
            reported: "while not serving it",
        },
        Planted {
            name: "skips-restore",
            switch: coyote_nodes::backups::planted::skip_restore,
            scenario: None,
            reported: "data: after the switch",
        },
    ];
    let mut missed = Vec::new();
    for bug in &bugs {
        match catch(bug) {
            Ok((seed, violation)) => eprintln!("{}: caught in seed {seed}: {violation}", bug.name),
            Err(e) => missed.push(e),
        }
    }
    assert!(missed.is_empty(), "{}", missed.join("\n"));
}
