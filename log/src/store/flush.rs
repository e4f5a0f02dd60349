//! Making the Raft log durable: syncs on the caller's thread, the leader's deferred flush, and how
//! far the log is durable (see "Log and vote" and "The leader's flush" in the store's docs).

use std::fmt::Debug;
use std::sync::atomic::Ordering;

use crate::filelog::FileLog;

use super::*;

/// How far the Raft log is on disk, published to the appliers and to the network (see "The leader's
/// flush" in the module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Durable {
    /// Every log entry up to this index is durable.
    pub index: u64,
    /// A deferred flush failed: nothing more will become durable, the node must stop.
    pub failed: bool,
}

/// What the deferred flush needs to know about the log's tail.
#[derive(Default)]
pub(super) struct Tail {
    /// The last index written (readable, maybe not durable).
    pub(super) appended: u64,
    /// Bumped by every truncation, so that a flush that started before one does not vouch for
    /// entries written at the same indexes after it.
    pub(super) generation: u64,
}

/// sled 0.34's `flush` writes its buffers and calls `sync_file_range`, which survives a killed process
/// but not a power loss (it flushes neither the drive's cache nor the file's metadata; sled's own
/// `fsync` runs from a background thread every 500 ms). So after it we `fdatasync` the segment file
/// ourselves, before anything is acknowledged. Values large enough to become sled blobs (only
/// snapshots here) are synced by sled when written.
pub(super) fn sync(
    db: &sled::Db,
    segments: Option<&std::fs::File>,
    action: &'static str,
) -> Result<(), StoreError> {
    db.flush().map_err(io(action))?;
    if let Some(file) = segments {
        file.sync_data().map_err(|e| io(action)(sled::Error::Io(e)))?;
    }
    Ok(())
}

impl Shared {
    pub(super) fn lock_tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn lock_wal(&self) -> std::sync::MutexGuard<'_, FileLog> {
        self.wal.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `fdatasync`s the Raft log: everything written to it so far is durable when this returns.
    pub(super) fn sync_wal(&self, action: &'static str) -> Result<(), StoreError> {
        if !self.durable {
            return Ok(());
        }
        let segment = self.lock_wal().sync_handle();
        segment.sync().map_err(|e| io(action)(sled::Error::Io(e)))
    }

    /// Whether entries of `term` appended now are this node's own, as the leader of `term`.
    pub(super) fn leads(&self, term: u64) -> bool {
        let me = self.node_id.load(Ordering::Relaxed);
        let vote = self.vote.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        me != 0
            && matches!(&*vote, Some(v) if v.is_committed()
                && v.leader_id().voted_for() == Some(me)
                && v.leader_id().term == term)
    }

    /// Records that the log now ends at `last`; returns the truncation generation.
    pub(super) fn note_appended(&self, last: u64) -> u64 {
        let mut tail = self.lock_tail();
        tail.appended = last;
        tail.generation
    }

    /// Records that a flush which began when the log ended at `target`, in `generation`, completed.
    pub(super) fn note_flushed(&self, target: u64, generation: u64) {
        let tail = self.lock_tail();
        if tail.generation == generation {
            self.durable_tx.send_if_modified(|d| {
                let moved = d.index < target;
                d.index = d.index.max(target);
                moved
            });
        }
    }

    /// The leader's flush, on the flusher thread: makes everything appended so far durable.
    pub(super) fn flush_deferred(&self) {
        let (target, generation) = {
            let tail = self.lock_tail();
            (tail.appended, tail.generation)
        };
        if self.durable_tx.borrow().index >= target {
            return; // an earlier flush covered it
        }
        tracing::debug!(target: "coyote_path", upto = target, "leader flush");
        match self.sync_wal("flush appended log entries") {
            Ok(()) => {
                self.note_flushed(target, generation);
                tracing::debug!(target: "coyote_path", upto = target, "leader flush done");
            }
            Err(e) => {
                tracing::error!(error = %e, "flushing the leader's log entries failed; this node must stop");
                self.durable_tx.send_modify(|d| d.failed = true);
            }
        }
    }

    /// Waits until the log is durable up to `index` (or up to its end, if it ends before: entries
    /// that did not come through `append` here, as in the store's own tests, have nothing to wait for).
    pub(super) async fn wait_durable(&self, index: u64) -> Result<(), StoreError> {
        let index = index.min(self.lock_tail().appended);
        let mut durable = self.durable_tx.subscribe();
        let reached = durable.wait_for(|d| d.index >= index || d.failed).await.map(|d| d.failed);
        match reached {
            Ok(false) => Ok(()),
            _ => Err(StoreError::Task {
                action: "flush appended log entries",
                reason: "an earlier flush failed".into(),
            }),
        }
    }

    /// Flushes every tree to disk, blocking this thread (a no-op when not durable).
    pub(super) fn flush_now(&self, action: &'static str) -> Result<(), StoreError> {
        if self.durable {
            sync(&self.db, self.segments.as_deref(), action)?;
        }
        Ok(())
    }
}
