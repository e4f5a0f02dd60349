//! Deterministic simulation of a coyote cluster's replicated log.
//!
//! Each seed builds a turmoil simulation with one host per node. Every host runs the real
//! [`coyote_log::LogNode`]: the same openraft, sled store, state machine, gRPC services and TLS as
//! `coyote node`, over turmoil's simulated TCP instead of the kernel's. Node 1 creates the cluster and
//! issues a join token; the others join through the real join path (token, CSR, certificate, learner,
//! promotion). Each node proposes alarms through its own `propose` (so forwarding to the leader is
//! exercised) and a client oracle records every acknowledged proposal. A seeded schedule then
//! partitions, isolates the leader, crashes and restarts nodes, holds links and raises latency;
//! after it a liveness phase requires the cluster to converge. The checkers in [`checks`] run every
//! half second of simulated time.
//!
//! A seed fixes everything: turmoil's network randomness, the fault schedule, the workload, Raft's
//! election timeouts ([`coyote_log::runtime`]) and the clock the proposals read. The trace of a run (faults,
//! leader changes, acknowledgements, the final archives) is hashed; running a seed twice gives the
//! same hash (`tests/determinism.rs`). The sources of nondeterminism closed for that are listed in
//! `sim/README.md`.
//!
//! With the `planted-bugs` feature, `--plant keep-conflicting-entries` switches on a deliberate Raft
//! bug in the store, which the checkers catch.
//!
//! Left out for now: the monitor, fence, failover and reconciler (they need a probe trait and a
//! container runtime model), one-way partitions, and the checkers that need them.

pub mod checks;
pub mod model;
pub mod net;
pub mod panics;
pub mod run;
pub mod scenario;

pub use run::{run_seed, Params, SeedReport};
pub use scenario::Scenario;
