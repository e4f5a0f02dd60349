//! Deterministic simulation of a coyote cluster.
//!
//! Each seed builds a turmoil simulation with one host per node. Every host runs the node that
//! `coyote node` runs, assembled by the same function (`coyote_nodes::node::Node::start`):
//! the log (openraft, the store, the state machine, gRPC and TLS over turmoil's simulated TCP), the
//! fence, the monitor probing services through turmoil, the reconciler and the activator driving a
//! model container engine ([`model`]), and the API router the simulated admin sends its commands
//! through. Node 1 creates the cluster and issues a join token; the others join through the real
//! join path; the simulated admin then creates services. Each node proposes alarms through its own
//! `propose` and a client oracle records every acknowledged proposal; visitors request the
//! on-demand services. A seeded
//! schedule then partitions (both ways or one way), isolates the leader or a master, crashes and
//! restarts nodes, holds links, raises latency, slows container starts and instructs switches; or a
//! hand-written [`scenario`] plays instead. After it a liveness phase requires the cluster and its
//! services to converge. The checkers in [`checks`] run after every step (serving, splices) or every
//! half second of simulated time (the rest).
//!
//! Where things are: [`params`] (what a run is, the simulated world's constants and services),
//! `world` (what hosts and driver share), `hosts` (each host's software), `workload` (admin, joins,
//! workload, visitors), `driver` (stepping, checking, formation, liveness), `faults` (the fault
//! schedule), [`scenario`] and `scripts` (the hand-written scenarios), [`checks`] (one checker per
//! file), [`model`] (containers and probes), [`net`] (turmoil sockets), [`run`] (one seed).
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
//! scenario `stale-placement` catches it), `--plant activator-ignores-fence` (an activator that
//! splices connections its fence does not allow), `--plant proxy-ignores-fence` (a proxy that hands
//! requests to containers its fence does not allow) and `--plant skips-restore` (a new master that
//! records a restore it did not make) switch on deliberate bugs, which the checkers catch.

pub mod checks;
mod driver;
mod faults;
mod hosts;
pub mod material;
pub mod model;
pub mod net;
pub mod panics;
pub mod params;
pub mod run;
pub mod scenario;
mod scripts;
mod workload;
mod world;

pub use params::Params;
pub use run::{run_seed, SeedReport};
pub use scenario::Scenario;
