//! The openraft type configuration, declared in one place, and what one Raft entry carries.

use std::io::Cursor;

use coyote_state_machine::{Outcome, Proposal};
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// Raft types of a coyote cluster: batches of proposals in, their outcomes out, u64 node ids.
    pub TypeConfig:
        D = Batch,
        R = Vec<Committed>,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = crate::runtime::CoyoteRuntime,
);

/// The payload of one normal Raft entry: the proposals the leader queued while earlier entries were
/// being written (group commit, see [`crate::cluster`]), applied in order. Each proposal becomes one
/// event with its own event index; the entry's log index is not an event index.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Batch(pub Vec<Proposal>);

/// What applying one proposal of a [`Batch`] gave: the event index it was archived under, and its
/// outcome.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Committed {
    pub index: u64,
    pub outcome: Outcome,
}

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
