//! A seed gives the same trace whatever the process ran before it, crashes included: the replay
//! command of a seed that failed among many (`--seeds N`, alone) must replay that same run.
//!
//! Alone in its own test binary: `cargo test` runs the tests of one binary on several threads, and
//! the tokio task numbers that once made a crash depend on the process's history are counted per
//! process (see `align_task_ids` in `src/run.rs`).

use std::time::Duration;

use coyote_sim::{run_seed, Params};

mod common;

#[test]
fn a_seed_with_a_crash_gives_the_same_trace_after_other_work() {
    let params = Params {
        nodes: 3,
        faults: Duration::from_secs(8),
        liveness: Duration::from_secs(20),
        ..Params::default()
    };
    // Seed 6 of these parameters crashes and restarts a node; the order in which a crashed node's
    // tasks are dropped depends on the number of tokio tasks made before it unless they are aligned.
    let seed = 6;
    let first = run_seed(seed, &params);
    assert!(first.violations.is_empty(), "seed {seed}: {:?}", first.violations);
    assert!(
        first.trace.iter().any(|line| line.contains("Crash")),
        "seed {seed} should crash a node, or this test proves nothing"
    );
    for extra in 0..4 {
        // Tasks made before the seed, as earlier seeds in the same process would make them.
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
        for _ in 0..extra {
            drop(rt.spawn(async {}));
        }
        drop(rt);
        let again = run_seed(seed, &params);
        common::assert_same_trace(&first, &again, &format!("seed {seed} after {extra} more tasks"));
    }
}
