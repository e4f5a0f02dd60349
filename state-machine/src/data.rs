//! The data ledger: which snapshots of each service's data exist and which nodes hold them.
//!
//! A service's data is snapshotted by its master into its own content-addressed store and shipped
//! to other nodes (the `coyote-data` crate and the node do that work). The log records what came of
//! it: `SnapshotTaken` (the master holds it), `SnapshotStored` (another node holds it, checked),
//! `SnapshotCorrupt` (a holder lost it), `BackupFailed`, `SnapshotForgotten` (retention) and
//! `RestoreCompleted` (a new master restored before serving). So every node knows from the log who
//! holds what, and a new master knows which snapshot to restore.
//!
//! # Epochs
//!
//! A service's epoch is the index of the event that made its current master the master: its
//! `ServiceCreated`, or the last `AuthoritySwitched` applied to it; or of an admin's later
//! `RestoreRequested` (a rollback in place), since what the master wrote before the rollback is
//! what the rollback discards. A snapshot is accepted only from
//! the current master at the current epoch. A master that was deposed (it may not know yet) carries
//! an older epoch, and its snapshot is refused: the data it describes may have diverged from the new
//! master's, and restoring it anywhere would bring back a past that the cluster moved away from.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::event::{Consistency, SnapshotKind};
use crate::{LogIndex, NodeId};

/// At most this many snapshots of one service in the ledger: retention forgets old ones long before.
pub const SNAPSHOTS_MAX: usize = 512;

/// Which snapshots of a service the ledger keeps (see [`Retention::retained`]). A service's spec
/// may give its own ([`crate::ServiceSpec::keep`]); [`RETENTION`] otherwise.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Retention {
    /// The newest this many.
    pub last: usize,
    /// The newest of each of the last this many hours that have one.
    pub hourly: usize,
    /// The same for days.
    pub daily: usize,
    /// The same for weeks.
    pub weekly: usize,
}

/// The retention of a service whose spec gives none.
pub const RETENTION: Retention = Retention { last: 10, hourly: 24, daily: 7, weekly: 4 };

/// The most snapshots a retention may ask to keep, all counts together: below [`SNAPSHOTS_MAX`],
/// with room for the newest snapshot of each node holding a role.
pub const RETENTION_MAX: usize = 400;

const HOUR_MS: u64 = 3_600_000;

impl Retention {
    /// Checks that the retention keeps at least the newest snapshot and at most [`RETENTION_MAX`].
    pub fn validate(&self) -> Result<(), crate::Rejection> {
        if self.last == 0 {
            return Err(crate::Rejection::new(
                "a retention keeps at least the newest snapshot (last=1 or more)".to_string(),
            ));
        }
        let total = [self.last, self.hourly, self.daily, self.weekly]
            .iter()
            .fold(0usize, |a, b| a.saturating_add(*b));
        if total > RETENTION_MAX {
            return Err(crate::Rejection::new(format!(
                "a retention keeps at most {RETENTION_MAX} snapshots in all; this one asks for {total}"
            )));
        }
        Ok(())
    }

    /// The ids of the snapshots to keep: those the policy keeps, and always the newest that each of
    /// `keep_for` (the nodes holding a role for the service) holds, so that no node loses the copy
    /// it would restore from. Buckets are counted on the snapshots' `taken_at_ms`, whole hours, days
    /// and weeks since the Unix epoch.
    pub fn retained(&self, ledger: &DataLedger, keep_for: &[NodeId]) -> BTreeSet<String> {
        let newest = ledger.newest_first();
        let mut keep: BTreeSet<String> = newest.iter().take(self.last).map(|r| r.id.clone()).collect();
        for (count, width) in
            [(self.hourly, HOUR_MS), (self.daily, 24 * HOUR_MS), (self.weekly, 7 * 24 * HOUR_MS)]
        {
            let mut buckets = BTreeSet::new();
            for r in &newest {
                if buckets.len() == count {
                    break;
                }
                if buckets.insert(r.taken_at_ms / width) {
                    keep.insert(r.id.clone());
                }
            }
        }
        for node in keep_for {
            if let Some(r) = ledger.newest_held_by(*node) {
                keep.insert(r.id.clone());
            }
        }
        keep
    }
}

/// Length of a snapshot id: a blake3 hash in lowercase hex.
pub const SNAPSHOT_ID_LEN: usize = 64;

/// What the log knows about one service's data.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct DataLedger {
    /// The index of the event that made the current master the master (see the module docs).
    pub epoch: LogIndex,
    /// Snapshots by id.
    pub snapshots: BTreeMap<String, SnapshotRecord>,
    /// The last backup failure on each node, until that node next stores a snapshot.
    pub failures: BTreeMap<NodeId, BackupFailure>,
    /// The restore of the current master at the current epoch, once it is done.
    pub restored: Option<Restored>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub id: String,
    pub parent: Option<String>,
    pub taken_by: NodeId,
    pub epoch: LogIndex,
    pub kind: SnapshotKind,
    pub consistency: Consistency,
    pub bytes: u64,
    pub new_bytes: u64,
    pub taken_at_ms: u64,
    /// The index of its `SnapshotTaken`: snapshots are ordered by it.
    pub taken_index: LogIndex,
    /// Nodes that hold every chunk of it, with when they said so.
    pub holders: BTreeMap<NodeId, u64>,
    /// Nodes where it was found corrupt (and that no longer hold it).
    pub corrupt_on: BTreeSet<NodeId>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BackupFailure {
    pub snapshot: Option<String>,
    pub reason: String,
    pub at_ms: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    pub node: NodeId,
    pub epoch: LogIndex,
    pub snapshot: Option<String>,
    pub at_ms: u64,
}

/// Whether `id` has the form of a snapshot id.
pub fn valid_snapshot_id(id: &str) -> bool {
    id.len() == SNAPSHOT_ID_LEN && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl DataLedger {
    /// A ledger for a service whose master became master at `epoch`.
    pub fn new(epoch: LogIndex) -> Self {
        DataLedger { epoch, ..DataLedger::default() }
    }

    /// Snapshots, newest first.
    pub fn newest_first(&self) -> Vec<&SnapshotRecord> {
        let mut all: Vec<&SnapshotRecord> = self.snapshots.values().collect();
        all.sort_by_key(|s| std::cmp::Reverse(s.taken_index));
        all
    }

    /// The newest snapshot some node holds.
    pub fn newest_held(&self) -> Option<&SnapshotRecord> {
        self.snapshots.values().filter(|s| !s.holders.is_empty()).max_by_key(|s| s.taken_index)
    }

    /// The one snapshot whose id starts with `prefix`, or the newest some node holds when `prefix` is
    /// `None`; `None` when no snapshot, or more than one, matches.
    pub fn find(&self, prefix: Option<&str>) -> Option<&SnapshotRecord> {
        let Some(prefix) = prefix else { return self.newest_held() };
        let mut matching = self.snapshots.values().filter(|r| r.id.starts_with(prefix));
        match (matching.next(), matching.next()) {
            (Some(r), None) => Some(r),
            _ => None,
        }
    }

    /// The newest snapshot `node` holds.
    pub fn newest_held_by(&self, node: NodeId) -> Option<&SnapshotRecord> {
        self.snapshots.values().filter(|s| s.holders.contains_key(&node)).max_by_key(|s| s.taken_index)
    }

    /// How old, at `now_ms`, the newest snapshot `node` holds is (`None`: it holds none): a
    /// failover's data age, what a failover now would lose at most.
    pub fn data_age_ms(&self, node: NodeId, now_ms: u64) -> Option<u64> {
        self.newest_held_by(node).map(|r| now_ms.saturating_sub(r.taken_at_ms))
    }

    /// Whether the current master has restored at the current epoch.
    pub fn restored_at_epoch(&self, master: NodeId) -> bool {
        self.restored.as_ref().is_some_and(|r| r.node == master && r.epoch == self.epoch)
    }
}

impl std::fmt::Display for Retention {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "last={},hourly={},daily={},weekly={}", self.last, self.hourly, self.daily, self.weekly)
    }
}

impl std::str::FromStr for Retention {
    type Err = crate::Rejection;

    /// `last=N,hourly=N,daily=N,weekly=N`; a count not given is the default's ([`RETENTION`]).
    fn from_str(text: &str) -> Result<Retention, crate::Rejection> {
        let mut keep = RETENTION;
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = || {
                crate::Rejection::new(format!(
                    "retention {item:?}: expected last=N, hourly=N, daily=N or weekly=N, separated by commas"
                ))
            };
            let (key, value) = item.split_once('=').ok_or_else(bad)?;
            let n: usize = value.trim().parse().map_err(|_| bad())?;
            match key.trim() {
                "last" => keep.last = n,
                "hourly" => keep.hourly = n,
                "daily" => keep.daily = n,
                "weekly" => keep.weekly = n,
                _ => return Err(bad()),
            }
        }
        keep.validate()?;
        Ok(keep)
    }
}
