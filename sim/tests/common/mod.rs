//! What the simulator's test binaries share.

use coyote_sim::SeedReport;

/// Panics unless the two runs gave the same trace, naming the first line where they part.
pub fn assert_same_trace(first: &SeedReport, again: &SeedReport, what: &str) {
    if again.trace_hash != first.trace_hash {
        let diverged = first.trace.iter().zip(&again.trace).position(|(a, b)| a != b);
        panic!(
            "{what} gave another trace (first difference at line {diverged:?}):\n{:?}\nvs\n{:?}",
            diverged.map(|i| &first.trace[i]),
            diverged.map(|i| &again.trace[i]),
        );
    }
}
