//! Openraft's storage traits over the store: [`LogStore`] (log and vote) and [`StateMachineStore`].

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use coyote_state_machine::Envelope;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder, StorageIOError, StoredMembership, Vote,
};

use crate::types::{Batch, Committed, Entry, LogId, Node, NodeId, StorageError, TypeConfig};

use super::*;

pub(super) fn read_logs(e: StoreError) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

pub(super) fn write_logs(e: StoreError) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

/// The Raft log and vote, for openraft. Cloning gives another handle to the same store (openraft uses
/// clones as log readers for replication).
#[derive(Clone)]
pub struct LogStore {
    pub(super) shared: Arc<Shared>,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.shared.read_entries(range).map_err(read_logs)
    }
}

impl LogStore {
    /// Tells the store which node it belongs to, so that it recognises the entries this node appends
    /// as leader and flushes them while they are replicated. Without it, every append is flushed
    /// before it is acknowledged.
    pub fn set_node_id(&self, id: NodeId) {
        self.shared.node_id.store(id, Ordering::Relaxed);
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let wal = self.shared.lock_wal();
        Ok(LogState { last_purged_log_id: wal.purged(), last_log_id: wal.last_log_id() })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let write_vote = |e: StoreError| StorageError::from(StorageIOError::write_vote(&e));
        self.shared.lock_wal().save_vote(vote).map_err(write_vote)?;
        self.shared.sync_wal("flush the vote").map_err(write_vote)?;
        *self.shared.vote.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.shared.lock_wal().vote())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // Written with the next record, not flushed: see the module documentation.
        self.shared.lock_wal().save_committed(committed);
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.shared.lock_wal().committed())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let own = entries.iter().all(|entry| self.shared.leads(entry.log_id.leader_id.term));
        let appended = {
            let mut wal = self.shared.lock_wal();
            #[cfg(feature = "planted-bugs")]
            let entries: Vec<Entry> = if planted::keeps_conflicting_entries() {
                // Only entries beyond the last one stored (all of them into an empty log).
                let last = wal.last_stored();
                entries.into_iter().filter(|e| last.is_none_or(|l| e.log_id.index > l)).collect()
            } else {
                entries
            };
            wal.append(&entries).map_err(write_logs)?
        };
        let Some(appended) = appended else {
            callback.log_io_completed(Ok(()));
            return Ok(());
        };
        let last = appended.last;
        tracing::debug!(target: "coyote_path", last, own, "append written");
        // Readable from here on, as openraft requires when `append` returns...
        let generation = self.shared.note_appended(last);
        if !self.shared.durable {
            self.shared.note_flushed(last, generation);
        } else if own {
            // ...the leader's own entries are synced by the flusher thread while they are replicated;
            // nothing is applied or announced as committed before they are durable here (module docs)...
            if let Some(flusher) = self.shared.flusher.get() {
                let _ = flusher.send(());
            }
        } else {
            // ...a follower's are durable before it says so: synced right here, on this thread, which
            // is waiting for them anyway.
            self.shared.sync_wal("flush appended log entries").map_err(write_logs)?;
            self.shared.note_flushed(last, generation);
            tracing::debug!(target: "coyote_path", last, "append flushed");
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        #[cfg(feature = "planted-bugs")]
        if planted::keeps_conflicting_entries() {
            return Ok(());
        }
        self.shared.lock_wal().truncate(log_id.index).map_err(write_logs)?;
        {
            let mut tail = self.shared.lock_tail();
            tail.generation += 1;
            tail.appended = log_id.index.saturating_sub(1);
        }
        self.shared.sync_wal("flush the truncated log").map_err(write_logs)?;
        // Everything left is flushed now.
        let left = log_id.index.saturating_sub(1);
        self.shared.durable_tx.send_modify(|d| d.index = left);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Not flushed (see the module docs); segments that hold only purged entries are deleted.
        self.shared.lock_wal().purge(log_id).map_err(write_logs)
    }
}

/// The state machine and its snapshots, for openraft. Cloning gives another handle to the same store
/// (openraft's snapshot builder is one).
#[derive(Clone)]
pub struct StateMachineStore {
    pub(super) shared: Arc<Shared>,
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let _building = self.shared.snapshot_lock.lock().await;
        let shared = self.shared.clone();
        // Reading and encoding the whole archive, then flushing, is long blocking work.
        let (meta, data) = blocking(self.shared.durable, "build a snapshot", move || shared.build_snapshot())
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, Node>), StorageError> {
        let machine = self.shared.read_machine();
        Ok((machine.last_applied, machine.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Committed>>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if let Some(last) = entries.last() {
            tracing::debug!(target: "coyote_path", last = last.log_id.index, "apply");
            // The leader's own entries may still be on their way to its disk.
            self.shared
                .wait_durable(last.log_id.index)
                .await
                .map_err(|e| StorageIOError::write_state_machine(&e))?;
        }
        let mut responses = Vec::with_capacity(entries.len());
        let last_index = {
            let mut machine = self.shared.write_machine();
            for entry in entries {
                let log_id = entry.log_id;
                if let Some(last) = machine.last_applied.filter(|last| last.index >= log_id.index) {
                    panic!(
                        "applying log entry {log_id} after {last} broke the cluster state (the log went \
                         backwards); stopping so that this replica does not diverge"
                    );
                }
                match entry.payload {
                    EntryPayload::Blank => responses.push(Vec::new()),
                    EntryPayload::Normal(Batch(proposals)) => {
                        let mut committed = Vec::with_capacity(proposals.len());
                        for proposal in proposals {
                            let index = machine.state.last_applied + 1;
                            let envelope = Envelope::new(index, log_id.leader_id.term, proposal);
                            let outcome = match machine.state.apply(&envelope) {
                                Ok(outcome) => outcome,
                                Err(e) => panic!(
                                    "applying event {index} of log entry {log_id} broke the cluster state \
                                     ({e}); stopping so that this replica does not diverge: {envelope:?}"
                                ),
                            };
                            let record = EventRecord { envelope, outcome: outcome.clone() };
                            machine.unarchived.push(record);
                            committed.push(Committed { index, outcome });
                        }
                        responses.push(committed);
                    }
                    EntryPayload::Membership(membership) => {
                        machine.membership = StoredMembership::new(Some(log_id), membership);
                        responses.push(Vec::new());
                    }
                }
                machine.last_applied = Some(log_id);
            }
            // Under the write lock, so readers see archive and state at the same log position. If this
            // fails, the state is ahead of the archive; openraft stops the node on the error, and a
            // restart rebuilds both from the snapshot and the log.
            if machine.unarchived.len() >= ARCHIVE_BATCH {
                self.shared
                    .archive_unarchived(&mut machine)
                    .map_err(|e| StorageIOError::write_state_machine(&e))?;
            }
            machine.last_applied.map(|l| l.index).unwrap_or(0)
        };
        self.shared.publish(last_index);
        tracing::debug!(target: "coyote_path", last_index, "applied");
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let _installing = self.shared.snapshot_lock.lock().await;
        let shared = self.shared.clone();
        let owned_meta = meta.clone();
        let data = snapshot.into_inner();
        let last_index = blocking(self.shared.durable, "install a snapshot", move || {
            shared.install_snapshot(&owned_meta, &data)
        })
        .await
        .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), &e))?;
        self.shared.publish(last_index);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let snapshot = self.shared.read_snapshot().map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(snapshot.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

impl Shared {
    /// The log entries in `range`.
    pub(super) fn read_entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry>, StoreError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => match i.checked_add(1) {
                Some(i) => i,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) if i < start => return Ok(Vec::new()),
            Bound::Excluded(&i) if i <= start => return Ok(Vec::new()),
            Bound::Included(&i) => Bound::Included(i),
            Bound::Excluded(&i) => Bound::Excluded(i),
            Bound::Unbounded => Bound::Unbounded,
        };
        self.lock_wal().read((Bound::Included(start), end))
    }
}
