//! Deterministic simulation of a coyote cluster.
//!
//! Each seed builds a turmoil simulation with one host per node. Every host runs the real
//! [`coyote_log::LogNode`] (the same openraft, sled store, state machine, gRPC services and TLS as
//! `coyote node`, over turmoil's simulated TCP) and beside it the real fence, monitor and reconciler of
//! `coyote_nodes`, the monitor probing services through turmoil and the reconciler driving a model
//! container engine ([`model`]). Node 1 creates the cluster and issues a join token; the others join
//! through the real join path; the simulated admin then creates services. Each node proposes alarms
//! through its own `propose` and a client oracle records every acknowledged proposal. A seeded
//! schedule then partitions (both ways or one way), isolates the leader or a master, crashes and
//! restarts nodes, holds links, raises latency, slows container starts and instructs switches; or a
//! hand-written [`scenario`] plays instead. After it a liveness phase requires the cluster and its
//! services to converge. The checkers in [`checks`] run after every step (serving) or every half
//! second of simulated time (the rest).
//!
//! A seed fixes everything: turmoil's network randomness, the fault schedule, the workload, Raft's
//! election timeouts ([`coyote_log::runtime`]), the container model's delays and the clock the nodes
//! read. The trace of a run (faults, leader changes, who serves what, switches, acknowledgements, the
//! final archives) is hashed; running a seed twice gives the same hash (`tests/determinism.rs`). The
//! sources of nondeterminism closed for that are listed in `sim/README.md`.
//!
//! With the `planted-bugs` feature, `--plant keep-conflicting-entries` (a Raft bug in the store),
//! `--plant backup-takes-over` (a backup that promotes itself), `--plant failover-ignores-votes`
//! (a failover rule without its majority) and `--plant stale-leader-confirms` (a leader that confirms
//! its leadership from old acknowledgements; the scenario `isolated-leader-confirms` catches it)
//! and `--plant placement-moves-master` (a placement that moves authority without a switch; the
//! scenario `stale-placement` catches it) and `--plant activator-ignores-fence` (an activator that
//! splices connections its fence does not allow) switch on deliberate bugs, which the checkers catch.

pub mod checks;
pub mod model;
pub mod net;
pub mod panics;
pub mod run;
pub mod scenario;

pub use run::{run_seed, Params, SeedReport};
pub use scenario::Scenario;
