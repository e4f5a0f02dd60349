//! The checkers: each one a pure function over snapshots of the nodes (and the client oracle), giving
//! the violations it finds as readable sentences. The simulator calls them after every check interval
//! and once more at the end; nothing here touches the simulation.

use std::collections::BTreeMap;

use coyote_log::store::EventRecord;
use coyote_state_machine::{Event, Placement};

mod acks;
mod convergence;
mod data;
mod leaders;
mod prefixes;
mod reach;
mod roles;
mod serving;
mod switches;

pub use acks::*;
pub use convergence::*;
pub use data::*;
pub use leaders::*;
pub use prefixes::*;
pub use reach::*;
pub use roles::*;
pub use serving::*;
pub use switches::*;

/// What one node looked like at one instant.
#[derive(Clone, Debug)]
pub struct NodeSnapshot {
    /// The turmoil host name (`n1`, ...).
    pub host: String,
    pub node_id: u64,
    /// Whether Raft on it considers itself leader.
    pub is_leader: bool,
    pub term: u64,
    /// Who it believes is leader.
    pub leader: Option<u64>,
    /// The index of the last event its state machine applied (events are numbered densely; one log
    /// entry can carry several).
    pub applied: u64,
    /// The last log index its state machine applied.
    pub log_applied: u64,
    /// Every archived event up to `applied`, in index order (shared with the driver's copy, which
    /// it extends by the new events at each check).
    pub archive: std::sync::Arc<Vec<EventRecord>>,
    /// Voters in the membership it knows.
    pub voters: Vec<u64>,
    /// Members in its applied state.
    pub members: Vec<u64>,
    /// Every service in its applied state, with its placement.
    pub placements: BTreeMap<String, Option<Placement>>,
    /// The nodes that left or were removed, in its applied state.
    pub departed: Vec<u64>,
    /// The services its fence lets it serve now.
    pub serving: Vec<String>,
    /// The services whose (model) container runs on its host now.
    pub containers: Vec<String>,
}

/// A proposal the cluster acknowledged: `propose` returned `Ok` with this index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub index: u64,
    pub actor: String,
    pub event: Event,
}

/// The record at `index` of an archive in index order (found where a dense archive from index 1 has
/// it, else by binary search).
fn record_at(archive: &[EventRecord], index: u64) -> Option<&EventRecord> {
    let dense = index.checked_sub(1).and_then(|i| archive.get(usize::try_from(i).ok()?));
    match dense {
        Some(r) if r.envelope.index == index => Some(r),
        _ => archive.binary_search_by_key(&index, |r| r.envelope.index).ok().map(|i| &archive[i]),
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use coyote_state_machine::{Envelope, Outcome, Proposal, SwitchCause};

    pub(crate) fn record(index: u64, key: &str) -> EventRecord {
        let event = Event::AlarmRaised { key: key.into(), node: None, service: None, message: String::new() };
        let proposal = Proposal { at_ms: 1, actor: "sim".into(), event };
        EventRecord { envelope: Envelope::new(index, 1, proposal), outcome: Outcome::Applied }
    }

    pub(crate) fn node(host: &str, applied: u64, archive: Vec<EventRecord>) -> NodeSnapshot {
        NodeSnapshot {
            host: host.into(),
            node_id: 1,
            is_leader: false,
            term: 1,
            leader: None,
            applied,
            log_applied: applied,
            archive: archive.into(),
            voters: vec![1],
            members: vec![1],
            placements: BTreeMap::new(),
            departed: Vec::new(),
            serving: Vec::new(),
            containers: Vec::new(),
        }
    }

    pub(crate) fn switch(cause: SwitchCause, to: u64, actor: &str) -> Switch {
        Switch {
            index: 9,
            at_ms: 10_000,
            actor: actor.into(),
            service: "a".into(),
            cause,
            to,
            before: Placement { master: 1, failover: Some(2), backups: vec![3, 4, 5] },
            members: 5,
            handover: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::record;
    use super::*;

    #[test]
    fn a_record_is_found_by_its_index_in_dense_and_sparse_archives() {
        let dense: Vec<EventRecord> = (1..=3).map(|i| record(i, "k")).collect();
        assert_eq!(record_at(&dense, 2).map(|r| r.envelope.index), Some(2));
        assert!(record_at(&dense, 0).is_none() && record_at(&dense, 4).is_none());
        let sparse = vec![record(2, "k"), record(5, "k"), record(9, "k")];
        assert_eq!(record_at(&sparse, 5).map(|r| r.envelope.index), Some(5));
        assert_eq!(record_at(&sparse, 9).map(|r| r.envelope.index), Some(9));
        assert!(record_at(&sparse, 3).is_none());
    }
}
