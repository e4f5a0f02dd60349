//! Running a seed twice gives the same trace.
//!
//! Each test runs its seeds one after the other on one thread. Crashes are left out of the schedule
//! here: `cargo test` runs this binary's tests on several threads at once, and the order in which a
//! crashed node's tasks are dropped follows tokio's task numbers, counted per process, so another
//! test's tasks would change it. `history.rs`, alone in its binary, runs a seed with a crash.

use std::time::Duration;

use coyote_sim::{run_seed, Params};

mod common;

#[test]
fn a_seed_run_twice_gives_the_same_trace() {
    let params = Params {
        nodes: 3,
        faults: Duration::from_secs(8),
        liveness: Duration::from_secs(20),
        crashes: false,
        ..Params::default()
    };
    for seed in [1, 2, 3] {
        let first = run_seed(seed, &params);
        let second = run_seed(seed, &params);
        assert!(first.violations.is_empty(), "seed {seed}: {:?}", first.violations);
        assert!(first.acks > 0, "seed {seed}: nothing was acknowledged");
        common::assert_same_trace(&first, &second, &format!("seed {seed} run twice"));
    }
}

#[test]
fn seeds_differ() {
    let params = Params { nodes: 3, faults: Duration::from_secs(4), crashes: false, ..Params::default() };
    let a = run_seed(10, &params);
    let b = run_seed(11, &params);
    assert_ne!(a.trace_hash, b.trace_hash, "two seeds should not give one trace");
}
