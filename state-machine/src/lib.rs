//! The domain of a coyote cluster: what can happen to it ([`Event`]), and what it is ([`State`]).
//!
//! # How it works
//!
//! Every change that matters is an event in the cluster's Raft log. A proposer (the CLI through the
//! local node, the monitor, the reconciler, later the CRM) builds a [`Proposal`]: the event, its own
//! clock reading (`at_ms`) and who it is (`actor`). It validates the proposal against its current view
//! of the state ([`State::validate`]) and proposes it. Once committed, the log wraps the proposal in an
//! [`Envelope`] with its index and term, and every replica calls [`State::apply`] with it.
//!
//! Between validation and application the state may move (another proposal got in first), so `apply`
//! checks the event again. One that no longer holds is recorded as [`Outcome::Rejected`], with its
//! reason, identically on every replica: the log keeps it and `events tail` shows it.
//!
//! This crate is pure: no async, no clock, no I/O, no randomness. Time and ids arrive inside the
//! envelope, so every replica derives byte-identical state from the same log, and a replay of the log
//! gives the same state (a property test checks it). Maps are ordered for the same reason.
//!
//! Roles (master / failover / backup), each node's desired containers, open alarms and valid tokens are
//! functions of the state ([`State::roles`], [`State::desired_containers`], [`State::open_alarms`],
//! [`State::valid_tokens`]).
//!
//! An `Err` from `apply` is not a rejection: it means an invariant ([`State::check_invariants`]) broke,
//! which is a bug. The caller must stop the node rather than let replicas diverge.
//!
//! # Authority
//!
//! Who masters a service is log state: the placement, moved by `AuthoritySwitched`. When a switch is
//! applied, the state machine derives the moment its new master may serve from: [`LEASE_MS`] plus
//! [`DRIFT_MARGIN_MS`] after the envelope's `at_ms` ([`serve_from`]). The old master stops serving
//! when it has not confirmed its place in the quorum for a lease period, so it has fenced itself by
//! then. The proposer's one clock reading is the envelope's; no proposer computes a moment of its own.
//!
//! # Derived, not proposed
//!
//! Actors propose intentions and observations; `apply` derives their consequences from the envelope
//! and the state. `ServiceCreated` places the new service ([`State::place`]), so a service and its
//! placement are one event. The events that can empty a failover slot or make a node able to fill one
//! (a switch, a join, a departure, a report about a node) refill every empty slot
//! ([`State::refill_failover`]). No actor proposes a placement: a placement computed on one replica and
//! committed later would be a stale fact (`PlacementSet` stays for placements set by hand, and is
//! refused when it would move the master).
//!
//! A switch *instructed* by an admin may name any member that holds a role for the service. A switch the
//! failover proposes *by itself* is accepted only when, in log state at that point:
//! - it names the service's failover (a backup never takes authority by itself);
//! - the failover has reported the service (and its zone) unreachable for at least
//!   [`FAILOVER_AFTER_MS`];
//! - a majority of all members report the master unreachable, so one broken link (a one-way partition
//!   between master and failover) never steals a healthy service.
//!
//! Reports are `ReachabilityChanged` events, proposed by monitors at transitions only. The rule is
//! checked on every replica against the same reports, so every replica accepts or rejects the same.
//!
//! # Data
//!
//! Each service has a [`DataLedger`]: its epoch (the index of the event that made its master the
//! master), the snapshots of its data and the nodes that hold each, the last backup failure per
//! node, and the current master's restore. A snapshot is accepted only from the current master at
//! the current epoch, so a deposed master's snapshot never enters the ledger (see [`data`]).
//!
//! # Left out, on purpose
//!
//! - Cluster-wide timing is fixed ([`LEASE_MS`], [`DRIFT_MARGIN_MS`], [`FAILOVER_AFTER_MS`]); making it
//!   a setting in the log is later work.
//! - Token secrets: the log only ever holds their SHA-256.

pub mod accounts;
pub mod certs;
pub mod data;
mod event;
pub mod spec;
mod state;

pub use accounts::{AccountEvent, Accounts, KeyScope, UserRole};
pub use data::{DataLedger, SnapshotRecord};
pub use event::{
    decode, encode, short_id, Consistency, Envelope, Event, NodeInfo, Placement, Proposal, SnapshotKind,
    Subject, SwitchCause, VersionedProposal, FORMAT_VERSION,
};
pub use spec::{PortMap, ServiceSpec, ZoneCheck};
pub use state::{
    cert_alarm_key, serve_from, sha256_hex, Alarm, ClusterInfo, ContainerGoal, DesiredContainer, Handover,
    Member, Observation, Outcome, Role, Service, State, StateV1, StateV2, StateV3, Token, TokenStatus,
    DRIFT_MARGIN_MS, FAILOVER_AFTER_MS, HANDOVER_WAIT_MS, LEASE_MS, PLACEMENT_BACKUPS_MAX,
    TOLERANCE_ALARM_KEY,
};

/// Deliberate bugs, for the simulator to show that its checkers catch them. Compiled only with the
/// `planted-bugs` feature, and off until switched on (a process-wide switch: the only state outside
/// [`State`], and only in that build).
#[cfg(feature = "planted-bugs")]
pub mod planted {
    use std::sync::atomic::{AtomicBool, Ordering};

    static FAILOVER_IGNORES_VOTES: AtomicBool = AtomicBool::new(false);

    /// The failover rule forgets its majority: a failover that has seen its service unreachable long
    /// enough takes over even while the other members still reach the master.
    pub fn failover_ignores_votes_on(on: bool) {
        FAILOVER_IGNORES_VOTES.store(on, Ordering::SeqCst);
    }

    pub(crate) fn failover_ignores_votes() -> bool {
        FAILOVER_IGNORES_VOTES.load(Ordering::SeqCst)
    }

    static PLACEMENT_MOVES_MASTER: AtomicBool = AtomicBool::new(false);

    /// A placement may change a placed service's master (the rule that only a switch moves
    /// authority is gone).
    pub fn placement_moves_master_on(on: bool) {
        PLACEMENT_MOVES_MASTER.store(on, Ordering::SeqCst);
    }

    pub(crate) fn placement_moves_master() -> bool {
        PLACEMENT_MOVES_MASTER.load(Ordering::SeqCst)
    }
}

/// `2026-11-25T12:40:52.123Z` from milliseconds since the epoch (UTC, proleptic Gregorian).
pub fn format_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Ids of nodes: sized, never reused within a cluster.
pub type NodeId = u64;
/// Position in the Raft log.
pub type LogIndex = u64;
/// Raft term.
pub type Term = u64;

/// Why a command does not hold against the current state: a deterministic answer for the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Rejection {
    pub reason: String,
}

impl Rejection {
    pub fn new(reason: impl Into<String>) -> Self {
        Rejection { reason: reason.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state broke an invariant: a bug; replicas must stop rather than diverge.
    #[error("state invariant violated: {0}")]
    Invariant(String),
    #[error("cannot decode stored data: {0}")]
    Decode(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod format_tests {
    use super::format_ms;

    #[test]
    fn times_format_as_utc() {
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(format_ms(1_795_610_452_123), "2026-11-25T12:40:52.123Z");
    }
}
