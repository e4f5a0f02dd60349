//! Durable storage for one node: the Raft log and vote in append-only files of our own
//! ([`crate::filelog`]), and the applied state, the archive of every applied event, the snapshot and
//! the node's own metadata in one sled database.
//!
//! # Layout
//!
//! [`open`] opens a `sled::Db` at the store's directory (`DIR/store`) and the Raft log in its
//! subdirectory `raft-log` ([`RAFT_LOG_DIR`]). The log's segment files hold the entries, the vote, the
//! commit index and the last purged log id (see [`crate::filelog`] for their format and recovery).
//! sled holds three trees:
//!
//! - `meta`: the node's own bytes stored through [`StoreHandle::meta_put`] (under a `user/` prefix).
//! - `events`: the archive. Key: the event index, big-endian. Value: an encoded [`EventRecord`], the
//!   envelope that was applied and what came of it (applied, or rejected with a reason). Event indexes
//!   are dense (1, 2, 3, ...) and are not log indexes: one log entry carries a [`Batch`] of proposals,
//!   and blank and membership entries carry none.
//! - `snapshot`: the current snapshot, its metadata and its data, written together in one batch.
//!
//! The default tree holds a format marker, `coyote-store/3`. A store of the format before
//! (`coyote-store/2`, whose Raft log and vote were in sled) is migrated by [`open`]: the new log is
//! built beside the store, renamed into place, and only then is the marker changed, so a crash during
//! the migration leaves the old store, and the next start migrates again. sled itself, given a
//! directory whose `db` or `conf` it cannot read, quietly starts an empty database over it; for us that
//! would be a node that forgot its vote and its log and rejoined as if new. So [`open`] only lets sled
//! at a directory that is absent or empty (a new store) or that holds sled's files, our log directory
//! and our marker. A new store is created in a sibling directory (`.NAME.creating`), marker written
//! and flushed and the first log segment written, then renamed into place, so that no crash can leave
//! a directory of ours without the marker or without its log. Anything else (stray files, another
//! program's sled database, a store sled can no longer read, a missing or damaged log) is refused with
//! a [`StoreError`]. Every record of the log is checked (CRC) and decoded before [`open`] returns, and
//! so is the snapshot, so damage is reported at start-up, with the place named, rather than as a
//! failure deep inside Raft later. sled's own `open` runs under `catch_unwind`: whatever is in the
//! directory, opening it returns an error and does not take the process down. sled releases its file
//! lock a moment after the last handle is dropped, so a store reopened within one process (a node
//! restarted in the simulation) may find it still held: that error alone is retried for two seconds.
//!
//! # Log and vote
//!
//! [`LogStore`] implements openraft's `RaftLogStorage` (storage v2) on the file log. `append` writes
//! all the entries of one call with one `write` at the end of the current segment; on a follower it
//! then `fdatasync`s the segment, right there on the calling thread (openraft waits for it anyway),
//! and only then tells openraft the entries are durable through the callback (for the leader see
//! below). Openraft hands over everything that accumulated since the previous call, so one
//! `fdatasync` covers a whole batch of proposals under load. No other thread takes part: sled and its
//! thread pool are not on the path of a log write. `save_vote` syncs before it returns, as Raft
//! requires: a node that forgot its vote could vote twice in a term. `truncate` syncs too, so that
//! conflicting entries a follower removed cannot come back after a crash and make its log look longer
//! than it is.
//!
//! # The leader's flush
//!
//! Openraft 0.9 waits for the leader's own `append` callback before it starts replicating the entries,
//! so a leader that synced first would put its `fsync` and a follower's in series on every write.
//! Instead, entries that this node appends as the leader of the current term (it knows its id from
//! [`LogStore::set_node_id`] and its committed vote from `save_vote`) are acknowledged as soon as they
//! are written, and synced by one dedicated flusher thread (`coyote-log-flush`, woken through a
//! channel) while they are replicated. Openraft may then count the leader in the quorum of an entry
//! that is not yet on the leader's disk, so that "commit" must stay invisible until the entry is
//! durable here:
//!
//! - `apply` waits until every entry it applies is durable on this node ([`Durable`]), so nothing is
//!   applied, and no client is answered (answers come after applying), on a quorum that only counts
//!   the leader's intention to write;
//! - the network ([`crate::network`]) holds back an AppendEntries whose commit index is beyond what is
//!   durable here until it is, so no follower applies such an entry either.
//!
//! So an entry becomes visible anywhere only once it is on the disks of a real majority: the leader's,
//! and those of the followers that acknowledged it (a follower syncs before it acknowledges). If the
//! leader crashes before its sync, the entry was applied nowhere and answered to nobody; it survives if
//! the next leader has it and is dropped otherwise, like any uncommitted entry. A failed sync marks the
//! store failed: `apply` returns an error and openraft stops the node. This is the leader writing its
//! log in parallel with replication, as the Raft dissertation (section 10.2.1) allows; the cost is one
//! blocked AppendEntries per follower while a sync finishes.
//!
//! The flusher reads how far the log was written (and the truncation generation) before it syncs, and
//! `fdatasync` makes durable every write that came before it: so the index it then publishes is
//! durable. Only the last segment can hold unsynced writes (a new segment begins after syncing the
//! old one), so syncing the segment current at that moment suffices. A truncation bumps the
//! generation, so a sync that began before it never vouches for entries written after it at the same
//! indexes; the truncation itself syncs and publishes what is left.
//!
//! Two writes are deliberately not synced:
//!
//! - `save_committed`: openraft only uses it to re-apply committed entries sooner after a restart. It
//!   is kept in memory and written in front of the next record, so it costs no write of its own. If it
//!   is lost, the node re-learns the commit index from the leader.
//! - `purge`: a lost purge record only brings old entries back, which costs space (they are covered by
//!   the snapshot, which `build_snapshot` flushed before openraft asked to purge). Deleting a segment
//!   file is different: the log is synced first, so the purge record is on disk before entries vanish.
//!
//! The durability argument for these relies on one property of the file log: recovery restores a
//! prefix of what was written (a torn tail is cut; a damaged record followed by data is an error, not
//! skipped). So if a later record survived a crash, every earlier one did too: a surviving commit
//! index implies the entries it covers, and they were written before it. The archive in sled and the
//! log in files are separate, and no such order holds between them; it is not needed: an event is
//! archived only when its entry is applied, and `apply` waits until the entry is durable in the log.
//!
//! # sled's flush
//!
//! What still goes to sled (snapshots, node metadata, a repaired archive) is flushed with sled's
//! `flush`, which writes and calls `sync_file_range`, and then an `fdatasync` of sled's segment file
//! (see `sync`: `sync_file_range` alone does not survive a power loss). None of it is on the path of
//! a write. We do not use `flush_async`: it completes on sled's own threads, which is a source of
//! nondeterminism in the simulation tests.
//!
//! # In memory, for the simulator
//!
//! [`open_memory`] opens a store on a [`MemoryDisk`], an in-memory sled database and in-memory log
//! segments ([`crate::filelog::MemorySegments`]), with [`Options::durable`] off: no sync, no flusher
//! thread, and nothing on the blocking pool (building and installing snapshots run inline). Those run
//! on other threads, outside the simulator's control; without them a run is deterministic. The code
//! paths are otherwise the same, the file log's framing and recovery included. What this leaves
//! untested is durability itself (which writes survive a crash): the kill -9 tests with real
//! processes and real directories, and the file log's own tests of torn tails, cover that.
//!
//! # State machine and archive
//!
//! [`StateMachineStore`] keeps the cluster [`State`] in memory. Applying an entry does not write the
//! state to disk: after a restart the state is the last snapshot's, and openraft re-applies the log
//! entries after it (it asks [`RaftStateMachine::applied_state`] where to start). Since applying is
//! pure and deterministic, the replay rebuilds exactly the same state. (Openraft replays at once up to
//! the saved commit index, the rest when the leader confirms it; meanwhile the node's view lags, as
//! any follower's may.) Each proposal of a normal entry's [`Batch`] becomes an `Envelope` (the next
//! event index, which the state counts, the entry's term, the proposal), `State::apply` gives its
//! outcome, and an [`EventRecord`] joins the events not yet written to the `events` tree, kept in
//! memory. They are written to the tree in one sled batch when [`ARCHIVE_BATCH`] of them are waiting,
//! and when a snapshot is built (before its flush, since openraft may then purge their log entries),
//! without a flush otherwise: like the state, a record after the last snapshot is rebuilt, byte for
//! byte, when its log entry is re-applied after a restart. (A sled batch per applied entry would cost
//! far more than the records in it.) Blank and membership
//! entries are not events and are not archived.
//!
//! An `Err` from `State::apply` means an invariant broke, which is a bug. Continuing would let this
//! replica diverge from the others, so the store panics with the entry and the reason, as toydb does.
//! The panic poisons the state lock, and every later reader through [`StoreHandle::with_state`]
//! panics as well rather than read a broken state: the node must stop.
//!
//! Readers outside Raft see the state through [`StoreHandle`]. It is behind a `std::sync::RwLock`, not
//! an async one: no critical section contains an `.await`, each is short (one apply batch is CPU work,
//! plus one sled batch every [`ARCHIVE_BATCH`] events), and readers can then be plain closures
//! callable from sync code. Applying holds the write lock while it adds the batch's archive records,
//! and [`StoreHandle::events`] reads the tree and the records in memory under the read lock and stops
//! at the last applied index, so a reader always sees the archive and the state at the same point of
//! the log. After each batch, the last applied index is published on a `tokio::sync::watch` channel
//! ([`StoreHandle::subscribe`]).
//!
//! # Snapshots
//!
//! A snapshot is one encoded value: the last applied log id, the last membership, the state and the
//! whole archive. The archive is in it because openraft purges the log after a snapshot: a node that
//! joins later, or falls too far behind, receives the snapshot instead of the entries, and without the
//! archive it would have the state but not the history of how the cluster got there (`events tail`
//! would differ between nodes). The cost: a snapshot grows with the whole history, not with the size
//! of the state; building one reads and re-encodes every archived event, and openraft keeps it in memory
//! as one buffer while it sends it. An event encodes to a few hundred bytes, so 100 000 events make a
//! snapshot of tens of megabytes: fine for a control plane's rate of joins, deploys and alarms, and
//! the limits below say what to do when it is not.
//!
//! `build_snapshot` writes the snapshot to the `snapshot` tree and flushes before returning it, so
//! that openraft can purge the log behind it. `install_snapshot` persists the received snapshot, then
//! replaces the state, the membership, the last applied log id and the whole `events` tree (in one
//! batch, under the write lock) with the snapshot's contents, then flushes. If a crash separates the
//! two writes, [`open`] notices that the archive up to the snapshot differs from the snapshot's and
//! rewrites it from the snapshot. On open, the persisted snapshot is loaded into memory, so
//! `applied_state` reports its last applied log id and openraft replays only the entries after it.
//! Building and installing are serialised by an async mutex, since openraft builds snapshots in a
//! separate task.
//!
//! # Left out, on purpose
//!
//! - The archive is never compacted, and snapshots carry all of it. If history grows to hundreds of
//!   megabytes, the way out is to stream the archive separately from the state (chunked transfer),
//!   not to drop history.
//! - One snapshot is kept; an older one is replaced, not retained.
//! - [`open`] is blocking (sled recovery reads the whole log); call it at start-up or in
//!   `spawn_blocking`. [`StoreHandle::meta_put`] blocks for one flush.
//! - sled's own data has no checksum of ours: sled checksums each record it writes; we check that every
//!   record decodes and that keys and contents agree. The Raft log has a CRC32 per record.
//! - No migration between sled versions: sled 0.34's on-disk format is what this store reads. The
//!   format marker and the versioned snapshot encoding leave room for a migration when it is needed;
//!   the one migration so far moved the Raft log out of sled (`coyote-store/2` to `/3`).
//! - No encryption at rest; the directory's permissions are the protection.
//! - [`StoreHandle::last_applied`] is 0 both before anything is applied and after the entry at index 0
//!   (openraft's initial membership entry). Event indexes start at 1.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use coyote_state_machine::{decode, encode, Envelope, Outcome, State};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageIOError,
    StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::filelog::{FileLog, Medium, MemorySegments};
use crate::types::{Batch, Committed, Entry, LogId, Node, NodeId, StorageError, TypeConfig};

/// Snapshot metadata, as openraft defines it for our types.
type Meta = SnapshotMeta<NodeId, Node>;

const META_TREE: &str = "meta";
const EVENTS_TREE: &str = "events";
const SNAPSHOT_TREE: &str = "snapshot";

/// Key of the format marker, in sled's default tree.
const FORMAT_KEY: &[u8] = b"coyote/store-format";
/// The format this code reads and writes: sled for the state machine's side, the Raft log and vote
/// in [`crate::filelog`] segments in the [`RAFT_LOG_DIR`] subdirectory.
const FORMAT: &[u8] = b"coyote-store/3";
/// The format before: the Raft log in sled's `log` tree, the vote, commit index and purge point in
/// `meta`. [`open`] migrates it.
const FORMAT_V2: &[u8] = b"coyote-store/2";
/// The subdirectory of the store that holds the Raft log's segments.
pub const RAFT_LOG_DIR: &str = "raft-log";
/// Where a migration from [`FORMAT_V2`] builds the Raft log before renaming it into place.
const MIGRATING_DIR: &str = "raft-log.migrating";

// Keys of the format before (read only by the migration).
const V2_LOG_TREE: &str = "log";
const V2_VOTE_KEY: &[u8] = b"raft/vote";
const V2_COMMITTED_KEY: &[u8] = b"raft/committed";
const V2_PURGED_KEY: &[u8] = b"raft/last-purged";
/// Prefix of the keys written through [`StoreHandle::meta_put`].
const USER_PREFIX: &[u8] = b"user/";

const SNAPSHOT_META_KEY: &[u8] = b"meta";
const SNAPSHOT_DATA_KEY: &[u8] = b"data";

/// An applied event as archived: the envelope and what applying it gave.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub envelope: Envelope,
    pub outcome: Outcome,
}

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory cannot be opened as a coyote store: missing permissions, locked by another process,
    /// damaged, or some other program's data.
    #[error("cannot open the store at {}: {reason}", path.display())]
    Open { path: PathBuf, reason: String },
    /// A record read from disk (or received in a snapshot) does not decode.
    #[error("{what} cannot be decoded: {reason}")]
    Corrupt { what: String, reason: String },
    /// Records decode but contradict each other or where they are stored.
    #[error("{what} is inconsistent: {reason}")]
    Inconsistent { what: String, reason: String },
    /// sled failed.
    #[error("cannot {action}: {source}")]
    Io {
        action: &'static str,
        #[source]
        source: sled::Error,
    },
    /// The blocking task that flushed or built a snapshot failed (it panicked or was cancelled).
    #[error("cannot {action}: the background task failed: {reason}")]
    Task { action: &'static str, reason: String },
}

fn io(action: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
    move |source| StoreError::Io { action, source }
}

fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt { what: what.into(), reason: reason.into() }
}

fn inconsistent(what: impl Into<String>, reason: impl Into<String>) -> StoreError {
    StoreError::Inconsistent { what: what.into(), reason: reason.into() }
}

/// Decodes a record read from disk; `what` names it in the error ("log entry 17").
pub(crate) fn decode_from_disk<T: DeserializeOwned>(
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> Result<T, StoreError> {
    decode(bytes).map_err(|e| {
        let reason = match e {
            coyote_state_machine::Error::Decode(reason) => reason,
            other => other.to_string(),
        };
        corrupt(what(), reason)
    })
}

/// Decodes a record of the event archive and checks that it carries the index it is stored under.
pub(crate) fn read_event_record(key: &[u8], value: &[u8]) -> Result<EventRecord, StoreError> {
    let index = key_index(key, EVENTS_TREE)?;
    let record: EventRecord = decode_from_disk(value, || format!("archived event {index}"))?;
    if record.envelope.index != index {
        return Err(inconsistent(
            format!("archived event {index}"),
            format!("it is stored at {index} but carries index {}", record.envelope.index),
        ));
    }
    Ok(record)
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8], tree: &str) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| {
        inconsistent(format!("a key of the {tree} tree"), format!("it is {} bytes, not 8", key.len()))
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Runs blocking store work on tokio's blocking pool and waits for it; for a store that is not
/// [`Options::durable`] (in memory, for the simulator), runs it right here instead.
async fn blocking<T: Send + 'static>(
    durable: bool,
    action: &'static str,
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    if !durable {
        return work();
    }
    tokio::task::spawn_blocking(work).await.map_err(|e| StoreError::Task { action, reason: e.to_string() })?
}

/// How a store is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Options {
    /// Flush (`fsync`) where the module documentation says so, on tokio's blocking pool. Always on in
    /// production. Off only for the simulator's in-memory stores ([`open_memory`]): then nothing is
    /// flushed and nothing runs on another thread, which keeps a simulation deterministic.
    pub durable: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options { durable: true }
    }
}

/// An in-memory sled database that outlives the stores opened on it: the simulator's disk. A node
/// "crashed" in the simulation drops its store; a restarted node opens this again with [`open_memory`]
/// and recovers from what was written, as a real node recovers from its directory. Every write counts
/// as durable the moment it is made, so this models a disk that never loses a flushed or unflushed
/// write: losing unflushed writes in a crash is covered by the kill -9 tests with real processes, not
/// by the simulator.
#[derive(Clone)]
pub struct MemoryDisk(sled::Db, MemorySegments);

impl MemoryDisk {
    /// A new, empty store in memory, with the format marker written.
    pub fn new() -> Result<Self, StoreError> {
        let failed = |reason: String| StoreError::Open { path: PathBuf::from("<memory>"), reason };
        // No periodic flush thread: nothing here is meant to reach a disk.
        let db = sled::Config::new()
            .temporary(true)
            .flush_every_ms(None)
            .open()
            .map_err(|e| failed(e.to_string()))?;
        db.insert(FORMAT_KEY, FORMAT).map_err(io("write the format marker"))?;
        let segments = MemorySegments::default();
        FileLog::create(&Medium::Memory(segments.clone()), false)?;
        Ok(MemoryDisk(db, segments))
    }
}

impl Debug for MemoryDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MemoryDisk")
    }
}

/// Everything in a snapshot, as encoded in its data. Versioned like the proposals in the log, so that a
/// later coyote can still read the snapshots an earlier one wrote.
#[derive(Serialize, Deserialize)]
enum SnapshotFile {
    /// Before graceful handovers: the state without them.
    V1(SnapshotBodyV1),
    V2(SnapshotBody),
}

#[derive(Serialize, Deserialize)]
struct SnapshotBodyV1 {
    last_applied: Option<LogId>,
    last_membership: StoredMembership<NodeId, Node>,
    state: coyote_state_machine::StateV1,
    archive: Vec<EventRecord>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotBody {
    pub(crate) last_applied: Option<LogId>,
    pub(crate) last_membership: StoredMembership<NodeId, Node>,
    pub(crate) state: State,
    pub(crate) archive: Vec<EventRecord>,
}

impl SnapshotBody {
    pub(crate) fn decode(data: &[u8], what: &str) -> Result<Self, StoreError> {
        Ok(match decode_from_disk(data, || what.to_string())? {
            SnapshotFile::V1(b) => SnapshotBody {
                last_applied: b.last_applied,
                last_membership: b.last_membership,
                state: b.state.into(),
                archive: b.archive,
            },
            SnapshotFile::V2(body) => body,
        })
    }

    /// The body as a snapshot's data.
    pub(crate) fn encode(self) -> Vec<u8> {
        encode(&SnapshotFile::V2(self))
    }

    /// Checks the body against its metadata and against itself.
    pub(crate) fn check(&self, meta: &Meta, what: &str) -> Result<(), StoreError> {
        let bad = |reason: String| Err(inconsistent(what, reason));
        if self.last_applied != meta.last_log_id {
            return bad(format!(
                "its data ends at {:?} but its metadata says {:?}",
                self.last_applied, meta.last_log_id
            ));
        }
        if self.last_membership != meta.last_membership {
            return bad("its data and its metadata name different memberships".into());
        }
        let Some(expected) = self.state.applied_count.checked_add(self.state.rejected_count) else {
            return bad("its state counts more events than a u64 holds".into());
        };
        if self.archive.len() as u64 != expected {
            return bad(format!("it archives {} events, its state counts {expected}", self.archive.len()));
        }
        for (position, record) in self.archive.iter().enumerate() {
            if record.envelope.index != position as u64 + 1 {
                return bad(format!(
                    "its archive holds event {} where event {} belongs",
                    record.envelope.index,
                    position + 1
                ));
            }
        }
        if self.state.last_applied != self.archive.len() as u64 {
            return bad(format!(
                "its state has applied {} events, its archive holds {}",
                self.state.last_applied,
                self.archive.len()
            ));
        }
        Ok(())
    }
}

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
struct Tail {
    /// The last index written (readable, maybe not durable).
    appended: u64,
    /// Bumped by every truncation, so that a flush that started before one does not vouch for
    /// entries written at the same indexes after it.
    generation: u64,
}

/// The applied state, in memory.
#[derive(Default)]
struct Machine {
    state: State,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, Node>,
    /// The last applied events not written to the `events` tree yet, in order, ending at the state's
    /// last event (see "State machine and archive" in the module docs).
    unarchived: Vec<EventRecord>,
}

/// Applied events are written to the `events` tree in batches of this many (and whenever a snapshot
/// is built). Each sled batch costs far more than the records in it.
pub const ARCHIVE_BATCH: usize = 512;

/// What the three handles share.
struct Shared {
    db: sled::Db,
    /// The Raft log and vote.
    wal: Mutex<FileLog>,
    meta: sled::Tree,
    events: sled::Tree,
    snapshot: sled::Tree,
    machine: RwLock<Machine>,
    applied_tx: watch::Sender<u64>,
    /// Serialises building and installing snapshots.
    snapshot_lock: tokio::sync::Mutex<()>,
    /// See [`Options::durable`].
    durable: bool,
    /// sled's segment file (`DIR/db`), `fdatasync`ed after every flush; `None` in memory.
    segments: Option<Arc<std::fs::File>>,
    /// This node's id once [`LogStore::set_node_id`] was called (0 before): appends of the leader
    /// it is are flushed in the background.
    node_id: AtomicU64,
    /// The last saved vote, to tell the leader's own appends from a follower's.
    vote: Mutex<Option<Vote<NodeId>>>,
    tail: Mutex<Tail>,
    durable_tx: watch::Sender<Durable>,
    /// Wakes the flusher thread, which syncs the leader's own appends (durable stores only).
    flusher: OnceLock<std::sync::mpsc::Sender<()>>,
}

/// sled 0.34's `flush` writes its buffers and calls `sync_file_range`, which survives a killed process
/// but not a power loss (it flushes neither the drive's cache nor the file's metadata; sled's own
/// `fsync` runs from a background thread every 500 ms). So after it we `fdatasync` the segment file
/// ourselves, before anything is acknowledged. Values large enough to become sled blobs (only
/// snapshots here) are synced by sled when written.
fn sync(db: &sled::Db, segments: Option<&std::fs::File>, action: &'static str) -> Result<(), StoreError> {
    db.flush().map_err(io(action))?;
    if let Some(file) = segments {
        file.sync_data().map_err(|e| io(action)(sled::Error::Io(e)))?;
    }
    Ok(())
}

impl Shared {
    fn read_machine(&self) -> RwLockReadGuard<'_, Machine> {
        self.machine
            .read()
            .expect("the state lock is poisoned: applying an entry panicked, this node must stop")
    }

    fn write_machine(&self) -> RwLockWriteGuard<'_, Machine> {
        self.machine
            .write()
            .expect("the state lock is poisoned: applying an entry panicked, this node must stop")
    }

    fn lock_tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_wal(&self) -> std::sync::MutexGuard<'_, FileLog> {
        self.wal.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `fdatasync`s the Raft log: everything written to it so far is durable when this returns.
    fn sync_wal(&self, action: &'static str) -> Result<(), StoreError> {
        if !self.durable {
            return Ok(());
        }
        let segment = self.lock_wal().sync_handle();
        segment.sync().map_err(|e| io(action)(sled::Error::Io(e)))
    }

    /// Whether entries of `term` appended now are this node's own, as the leader of `term`.
    fn leads(&self, term: u64) -> bool {
        let me = self.node_id.load(Ordering::Relaxed);
        let vote = self.vote.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        me != 0
            && matches!(&*vote, Some(v) if v.is_committed()
                && v.leader_id().voted_for() == Some(me)
                && v.leader_id().term == term)
    }

    /// Records that the log now ends at `last`; returns the truncation generation.
    fn note_appended(&self, last: u64) -> u64 {
        let mut tail = self.lock_tail();
        tail.appended = last;
        tail.generation
    }

    /// Records that a flush which began when the log ended at `target`, in `generation`, completed.
    fn note_flushed(&self, target: u64, generation: u64) {
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
    fn flush_deferred(&self) {
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
    async fn wait_durable(&self, index: u64) -> Result<(), StoreError> {
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

    /// Tells subscribers the last applied index, if it moved.
    fn publish(&self, last_index: u64) {
        self.applied_tx.send_if_modified(|published| std::mem::replace(published, last_index) != last_index);
    }

    /// Flushes every tree to disk, blocking this thread (a no-op when not durable).
    fn flush_now(&self, action: &'static str) -> Result<(), StoreError> {
        if self.durable {
            sync(&self.db, self.segments.as_deref(), action)?;
        }
        Ok(())
    }

    /// The log entries in `range`.
    fn read_entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry>, StoreError> {
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

    /// Archived events with indexes in `[from, upto]`, at most `limit` of them: from the `events` tree,
    /// then from `unarchived` (the events after the tree's, see [`Machine::unarchived`]).
    fn read_events(
        &self,
        from: u64,
        upto: u64,
        limit: usize,
        unarchived: &[EventRecord],
    ) -> Result<Vec<EventRecord>, StoreError> {
        let mut records = Vec::new();
        if from > upto {
            return Ok(records);
        }
        // The tree may hold records past the first unarchived one, written before a restart; the
        // unarchived records are the applied ones.
        let tree_upto = match unarchived.first() {
            Some(first) => upto.min(first.envelope.index.saturating_sub(1)),
            None => upto,
        };
        let from_tree = (from <= tree_upto)
            .then(|| self.events.range(index_key(from)..=index_key(tree_upto)).take(limit));
        for item in from_tree.into_iter().flatten() {
            let (key, value) = item.map_err(io("read the event archive"))?;
            records.push(read_event_record(&key, &value)?);
        }
        let rest = unarchived
            .iter()
            .filter(|r| r.envelope.index >= from && r.envelope.index <= upto)
            .take(limit - records.len());
        records.extend(rest.cloned());
        Ok(records)
    }

    /// Writes the unarchived events to the `events` tree, in one batch (without a flush: like the
    /// state, they are rebuilt by re-applying their entries after a restart).
    fn archive_unarchived(&self, machine: &mut Machine) -> Result<(), StoreError> {
        if machine.unarchived.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for record in &machine.unarchived {
            batch.insert(&index_key(record.envelope.index), encode(record));
        }
        self.events.apply_batch(batch).map_err(io("archive applied events"))?;
        machine.unarchived.clear();
        Ok(())
    }

    /// The persisted snapshot: its metadata and its data, both checked.
    fn read_snapshot(&self) -> Result<Option<(Meta, Vec<u8>)>, StoreError> {
        let meta = self.snapshot.get(SNAPSHOT_META_KEY).map_err(io("read the snapshot"))?;
        let data = self.snapshot.get(SNAPSHOT_DATA_KEY).map_err(io("read the snapshot"))?;
        match (meta, data) {
            (None, None) => Ok(None),
            (Some(meta), Some(data)) => {
                let meta = decode_from_disk(&meta, || "the saved snapshot's metadata".to_string())?;
                Ok(Some((meta, data.to_vec())))
            }
            _ => Err(inconsistent("the saved snapshot", "its metadata or its data is missing")),
        }
    }

    /// Writes a snapshot (metadata and data in one batch); the caller flushes.
    fn write_snapshot(&self, meta: &Meta, data: &[u8]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        batch.insert(SNAPSHOT_META_KEY, encode(meta));
        batch.insert(SNAPSHOT_DATA_KEY, data);
        self.snapshot.apply_batch(batch).map_err(io("write the snapshot"))
    }

    /// Replaces the whole archive with `archive`, in one batch.
    fn replace_archive(&self, archive: &[EventRecord]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in self.events.iter().keys() {
            batch.remove(key.map_err(io("read the event archive"))?);
        }
        for record in archive {
            batch.insert(&index_key(record.envelope.index), encode(record));
        }
        self.events.apply_batch(batch).map_err(io("replace the event archive"))
    }

    /// Makes the archive up to the snapshot equal to the snapshot's, if a crash left it otherwise.
    /// Returns whether it had to.
    fn repair_archive(&self, body: &SnapshotBody) -> Result<bool, StoreError> {
        let upto = body.state.last_applied;
        let mut stored = self.events.range(..=index_key(upto));
        let mut same = true;
        for record in &body.archive {
            match stored.next() {
                Some(Ok((key, value)))
                    if *key == index_key(record.envelope.index) && *value == *encode(record) => {}
                Some(Err(e)) => return Err(io("read the event archive")(e)),
                _ => {
                    same = false;
                    break;
                }
            }
        }
        if same && stored.next().is_none() {
            return Ok(false);
        }
        let mut batch = sled::Batch::default();
        for key in self.events.range(..=index_key(upto)).keys() {
            batch.remove(key.map_err(io("read the event archive"))?);
        }
        for record in &body.archive {
            batch.insert(&index_key(record.envelope.index), encode(record));
        }
        self.events.apply_batch(batch).map_err(io("repair the event archive"))?;
        self.flush_now("flush the repaired event archive")?;
        Ok(true)
    }

    /// Builds a snapshot of the state as it is now and persists it durably. Blocking.
    fn build_snapshot(&self) -> Result<(Meta, Vec<u8>), StoreError> {
        let (state, last_applied, last_membership) = {
            let mut machine = self.write_machine();
            // The snapshot lets openraft purge the log behind it: from then on its events are only
            // in the archive, which the flush below makes durable.
            self.archive_unarchived(&mut machine)?;
            (machine.state.clone(), machine.last_applied, machine.membership.clone())
        };
        // Records up to the state's last event never change once written (only installing a snapshot rewrites
        // them, with the same committed contents, and that waits for the snapshot lock we hold), so
        // reading them after releasing the state lock still gives the archive of this state.
        let archive = self.read_events(1, state.last_applied, usize::MAX, &[])?;
        // A snapshot id only has to be unique; sled's id generator survives restarts.
        let seq = self.db.generate_id().map_err(io("generate a snapshot id"))?;
        let snapshot_id = match last_applied {
            Some(last) => format!("{}-{}-{seq}", last.leader_id.term, last.index),
            None => format!("none-{seq}"),
        };
        let meta =
            SnapshotMeta { last_log_id: last_applied, last_membership: last_membership.clone(), snapshot_id };
        let body = SnapshotBody { last_applied, last_membership, state, archive };
        body.check(&meta, "the snapshot being built")?;
        let data = body.encode();
        self.write_snapshot(&meta, &data)?;
        self.flush_now("flush the snapshot")?;
        Ok((meta, data))
    }

    /// Persists a received snapshot and replaces the state and the archive with its contents. Blocking.
    fn install_snapshot(&self, meta: &Meta, data: &[u8]) -> Result<u64, StoreError> {
        let what = format!("the received snapshot {}", meta.snapshot_id);
        let body = SnapshotBody::decode(data, &what)?;
        body.check(meta, &what)?;
        // Snapshot first: if a crash comes before the archive is replaced, `open` repairs the archive
        // from it. sled recovers writes in order, so the reverse (new archive, old snapshot) cannot be.
        self.write_snapshot(meta, data)?;
        let last_index = {
            let mut machine = self.write_machine();
            self.replace_archive(&body.archive)?;
            machine.unarchived.clear();
            machine.state = body.state;
            machine.last_applied = body.last_applied;
            machine.membership = body.last_membership;
            machine.last_applied.map(|l| l.index).unwrap_or(0)
        };
        self.flush_now("flush the installed snapshot")?;
        Ok(last_index)
    }
}

/// Files and directories sled 0.34 keeps in a database directory, and our Raft log's directory.
fn is_sled_file(name: &str) -> bool {
    matches!(name, "conf" | "db" | "blobs" | RAFT_LOG_DIR | MIGRATING_DIR) || name.starts_with("snap.")
}

/// Opens the store's sled database, or creates it. Errors and panics of sled become a reason.
///
/// sled "recovers" a directory whose `db` or `conf` it cannot read by starting an empty database over
/// it. That would make a damaged store look like a new node that remembers no vote and no log, so
/// sled is only ever pointed at a directory that is absent, empty, or holds both `conf` and `db`; and a
/// new store is created elsewhere and renamed into place with its format marker already written (see
/// [`create_db`]), so an existing directory without the marker is never ours.
fn open_db(path: &Path) -> Result<sled::Db, String> {
    let existing = match std::fs::read_dir(path) {
        Ok(entries) => {
            let mut names = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| format!("cannot list the directory: {e}"))?;
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            names
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("cannot list the directory: {e}")),
    };
    if existing.is_empty() {
        create_db(path)?;
    } else if existing.iter().any(|n| !is_sled_file(n))
        || !["conf", "db"].iter().all(|f| existing.iter().any(|n| n == f))
    {
        return Err(format!(
            "the directory is not empty and does not hold a coyote store (it contains: {})",
            existing.join(", ")
        ));
    }
    let db = sled_open(path)?;
    check_format(&db)?;
    Ok(db)
}

/// Runs `sled::open`, turning a panic into an error.
///
/// sled locks its `db` file, and releases the lock only when its background threads let go of the
/// file, a little after the last handle is dropped. So a store closed and reopened within one process
/// (a restarted node in the simulation, a test) can find it still locked for a moment: that error alone
/// is retried, for up to [`LOCK_WAIT`]. Another process holding the store gets the error after that.
fn sled_open(path: &Path) -> Result<sled::Db, String> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled_open_once(path) {
            Err(e) if e.contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

/// How long [`sled_open`] waits for a lock held by a store closed a moment ago.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn sled_open_once(path: &Path) -> Result<sled::Db, String> {
    match std::panic::catch_unwind(|| sled::Config::new().path(path).open()) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(format!("sled panicked while opening it: {message}"))
        }
    }
}

/// Creates a new store at `path` (absent or an empty directory): in a sibling directory first, with the
/// format marker written and flushed, then renamed into place. A crash leaves either no store or a
/// complete empty one, never a directory without its marker.
fn create_db(path: &Path) -> Result<(), String> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err("the path has no parent directory to create the store in".into());
    };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let staging = parent.join(format!(".{}.creating", name.to_string_lossy()));
    if staging.exists() {
        // Left by a crash during an earlier creation: nothing in it was ever used.
        std::fs::remove_dir_all(&staging).map_err(|e| format!("cannot remove {}: {e}", staging.display()))?;
    }
    {
        let db = sled_open(&staging)?;
        db.insert(FORMAT_KEY, FORMAT).map_err(|e| format!("cannot write the format marker: {e}"))?;
        db.flush().map_err(|e| format!("cannot flush the new store: {e}"))?;
    }
    FileLog::create(&Medium::Dir(staging.join(RAFT_LOG_DIR)), true)
        .map_err(|e| format!("cannot create the Raft log: {e}"))?;
    if path.exists() {
        std::fs::remove_dir(path).map_err(|e| format!("cannot replace the empty directory: {e}"))?;
    }
    std::fs::rename(&staging, path).map_err(|e| format!("cannot move the new store into place: {e}"))?;
    // The rename itself must reach the disk.
    std::fs::File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", parent.display()))?;
    Ok(())
}

/// Checks the format marker: the current format, or (`Ok(false)`) the one before, to migrate.
fn check_format(db: &sled::Db) -> Result<bool, String> {
    match db.get(FORMAT_KEY).map_err(|e| format!("cannot read the format marker: {e}"))? {
        Some(found) if *found == *FORMAT => Ok(true),
        Some(found) if *found == *FORMAT_V2 => Ok(false),
        Some(found) => Err(format!(
            "it holds store format {:?}, this coyote reads {:?} (and migrates {:?})",
            String::from_utf8_lossy(&found),
            String::from_utf8_lossy(FORMAT),
            String::from_utf8_lossy(FORMAT_V2)
        )),
        None => {
            Err("it is a sled database without a coyote format marker: another program's, or damaged".into())
        }
    }
}

/// Moves the Raft log, vote, commit index and purge point of a [`FORMAT_V2`] store out of sled into a
/// new file log, then marks the store as the current format. The new log is built beside the store's
/// files and renamed into place, and the marker changes only after that, so a crash at any point
/// leaves either the old store (and the migration runs again) or the new one.
fn migrate_v2(path: &Path, db: &sled::Db) -> Result<(), StoreError> {
    let what = |e: StoreError| StoreError::Open {
        path: path.to_path_buf(),
        reason: format!("migrating the store from {}: {e}", String::from_utf8_lossy(FORMAT_V2)),
    };
    let meta = db.open_tree(META_TREE).map_err(io("open the store's trees")).map_err(what)?;
    let get = |key: &[u8]| -> Result<Option<Vec<u8>>, StoreError> {
        let value = meta.get(key).map_err(io("read the store metadata"))?;
        Ok(value.map(|v| v.to_vec()))
    };
    let vote: Option<Vote<NodeId>> = get(V2_VOTE_KEY)
        .and_then(|v| v.map(|b| decode_from_disk(&b, || "the saved vote".into())).transpose())
        .map_err(what)?;
    let committed: Option<Option<LogId>> = get(V2_COMMITTED_KEY)
        .and_then(|v| v.map(|b| decode_from_disk(&b, || "the saved commit index".into())).transpose())
        .map_err(what)?;
    let purged: Option<LogId> = get(V2_PURGED_KEY)
        .and_then(|v| v.map(|b| decode_from_disk(&b, || "the last purged log id".into())).transpose())
        .map_err(what)?;
    let log = db.open_tree(V2_LOG_TREE).map_err(io("open the store's trees")).map_err(what)?;
    let staging = path.join(MIGRATING_DIR);
    let target = path.join(RAFT_LOG_DIR);
    let build = || -> Result<(), StoreError> {
        for dir in [&staging, &target] {
            if dir.exists() {
                // Left by an interrupted migration: the old store is still the authority.
                std::fs::remove_dir_all(dir)
                    .map_err(|e| io("remove an unfinished migration")(sled::Error::Io(e)))?;
            }
        }
        let medium = Medium::Dir(staging.clone());
        FileLog::create(&medium, true)?;
        let mut wal = FileLog::open(medium, true)?;
        if let Some(purged) = purged {
            wal.purge(purged)?;
        }
        let mut entries = Vec::new();
        for item in log.iter() {
            let (key, value) = item.map_err(io("read log entries"))?;
            let index = key_index(&key, V2_LOG_TREE)?;
            let entry: Entry = decode_from_disk(&value, || format!("log entry {index}"))?;
            if entry.log_id.index != index {
                return Err(inconsistent(
                    format!("log entry {index}"),
                    format!("it is stored at {index} but carries index {}", entry.log_id.index),
                ));
            }
            if purged.is_none_or(|p| index > p.index) {
                entries.push(entry);
            }
        }
        wal.append(&entries)?;
        wal.save_committed(committed.flatten());
        match vote {
            Some(vote) => wal.save_vote(&vote)?,
            None => wal.flush_committed()?,
        }
        wal.sync_handle().sync().map_err(|e| io("sync the Raft log")(sled::Error::Io(e)))?;
        drop(wal);
        std::fs::rename(&staging, &target)
            .map_err(|e| io("move the Raft log into place")(sled::Error::Io(e)))?;
        std::fs::File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync the store directory")(sled::Error::Io(e)))?;
        db.insert(FORMAT_KEY, FORMAT).map_err(io("write the format marker"))?;
        sync(db, None, "flush the format marker")?;
        // The old records are dead from here on.
        db.drop_tree(V2_LOG_TREE).map_err(io("drop the old log tree"))?;
        for key in [V2_VOTE_KEY, V2_COMMITTED_KEY, V2_PURGED_KEY] {
            meta.remove(key).map_err(io("remove old metadata"))?;
        }
        sync(db, None, "flush the migrated store")?;
        tracing::info!(store = %path.display(), entries = entries.len(), "moved the Raft log out of sled into its own files");
        Ok(())
    };
    build().map_err(what)
}

/// Opens (or creates) the store in directory `path`: the Raft log store and state machine to hand to
/// openraft, and a handle for everyone else. Blocking: call it at start-up or in `spawn_blocking`.
/// A store of the format before is migrated first (`migrate_v2`).
pub fn open(path: &Path) -> Result<(LogStore, StateMachineStore, StoreHandle), StoreError> {
    let failed = |reason: String| StoreError::Open { path: path.to_path_buf(), reason };
    let db = open_db(path).map_err(failed)?;
    if !check_format(&db).map_err(failed)? {
        migrate_v2(path, &db)?;
    }
    let wal = FileLog::open(Medium::Dir(path.join(RAFT_LOG_DIR)), true).map_err(|e| failed(e.to_string()))?;
    let mut shared = load(db, wal, Options::default()).map_err(|e| failed(e.to_string()))?;
    let segments = std::fs::File::open(path.join("db"))
        .map_err(|e| failed(format!("cannot open the segment file for syncing: {e}")))?;
    shared.segments = Some(Arc::new(segments));
    handles(shared).map_err(|e| failed(e.to_string()))
}

/// Opens the store kept on `disk`, not durable (see [`Options::durable`]): for the simulator. Opening
/// it again after the previous store on it was dropped recovers like [`open`] does after a restart.
pub fn open_memory(disk: &MemoryDisk) -> Result<(LogStore, StateMachineStore, StoreHandle), StoreError> {
    let failed = |reason: String| StoreError::Open { path: PathBuf::from("<memory>"), reason };
    if !check_format(&disk.0).map_err(failed)? {
        return Err(failed("an in-memory store of the format before".into()));
    }
    let wal = FileLog::open(Medium::Memory(disk.1.clone()), false).map_err(|e| failed(e.to_string()))?;
    let shared = load(disk.0.clone(), wal, Options { durable: false }).map_err(|e| failed(e.to_string()))?;
    handles(shared).map_err(|e| failed(e.to_string()))
}

fn handles(shared: Shared) -> Result<(LogStore, StateMachineStore, StoreHandle), StoreError> {
    let shared = Arc::new(shared);
    if shared.durable {
        // The flusher thread holds only a weak reference: it ends when the store is dropped (its
        // channel closes), and does not keep the store (and sled's lock) alive.
        let (wake, woken) = std::sync::mpsc::channel::<()>();
        let store = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name("coyote-log-flush".into())
            .spawn(move || {
                while woken.recv().is_ok() {
                    while woken.try_recv().is_ok() {}
                    let Some(shared) = store.upgrade() else { return };
                    shared.flush_deferred();
                }
            })
            .map_err(|e| StoreError::Task { action: "start the flusher thread", reason: e.to_string() })?;
        let _ = shared.flusher.set(wake);
    }
    Ok((
        LogStore { shared: shared.clone() },
        StateMachineStore { shared: shared.clone() },
        StoreHandle { shared },
    ))
}

/// Checks the database, loads the snapshot and builds the shared store.
fn load(db: sled::Db, wal: FileLog, options: Options) -> Result<Shared, StoreError> {
    let tree = |name: &str| db.open_tree(name).map_err(io("open the store's trees"));
    let (meta, events, snapshot) = (tree(META_TREE)?, tree(EVENTS_TREE)?, tree(SNAPSHOT_TREE)?);
    let (applied_tx, _) = watch::channel(0);
    let (durable_tx, _) = watch::channel(Durable::default());
    // What is on disk at start-up counts as durable.
    let last = wal.last_index();
    let vote = wal.vote();
    let shared = Shared {
        db,
        wal: Mutex::new(wal),
        meta,
        events,
        snapshot,
        machine: RwLock::new(Machine::default()),
        applied_tx,
        snapshot_lock: tokio::sync::Mutex::new(()),
        durable: options.durable,
        segments: None,
        node_id: AtomicU64::new(0),
        vote: Mutex::new(vote),
        tail: Mutex::new(Tail { appended: last, generation: 0 }),
        durable_tx,
        flusher: OnceLock::new(),
    };
    shared.durable_tx.send_modify(|d| d.index = last);
    let mut shared = shared;

    if let Some((meta, data)) = shared.read_snapshot()? {
        let body = SnapshotBody::decode(&data, "the saved snapshot")?;
        body.check(&meta, "the saved snapshot")?;
        if shared.repair_archive(&body)? {
            tracing::warn!(snapshot = %meta.snapshot_id, "rewrote the event archive from the saved snapshot");
        }
        let last_index = body.last_applied.map(|l| l.index).unwrap_or(0);
        *shared.machine.get_mut().expect("a new lock is not poisoned") = Machine {
            state: body.state,
            last_applied: body.last_applied,
            membership: body.last_membership,
            unarchived: Vec::new(),
        };
        shared.publish(last_index);
    }
    Ok(shared)
}

fn read_logs(e: StoreError) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_logs(e: StoreError) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

/// The Raft log and vote, for openraft. Cloning gives another handle to the same store (openraft uses
/// clones as log readers for replication).
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
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
    shared: Arc<Shared>,
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

/// Read access to the store for the rest of the node (API, reconciler, monitor), and its own metadata.
#[derive(Clone)]
pub struct StoreHandle {
    shared: Arc<Shared>,
}

impl StoreHandle {
    /// Runs `f` on the current state. Keep `f` short: appliers wait while it runs.
    ///
    /// Panics if applying an entry panicked earlier (a broken invariant): the node must stop.
    pub fn with_state<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.shared.read_machine().state)
    }

    /// Up to `limit` archived events, in event index order, from `from_index` (inclusive) to the last
    /// applied event. Events the state has not caught up with yet (after a restart) are not returned.
    pub fn events(&self, from_index: u64, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        let machine = self.shared.read_machine();
        self.shared.read_events(from_index.max(1), machine.state.last_applied, limit, &machine.unarchived)
    }

    /// The index of the last applied event (0 before the first). Not a log index: see [`Batch`].
    pub fn last_event(&self) -> u64 {
        self.shared.read_machine().state.last_applied
    }

    /// How far the Raft log is durable on this node.
    pub fn durable(&self) -> watch::Receiver<Durable> {
        self.shared.durable_tx.subscribe()
    }

    /// The last applied log index, updated after each applied batch and each installed snapshot.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.applied_tx.subscribe()
    }

    /// The last applied log index (0 when nothing is applied yet).
    pub fn last_applied(&self) -> u64 {
        *self.shared.applied_tx.borrow()
    }

    /// Bytes free for unprivileged writers on the file system that holds the store; `None` for a
    /// store in memory.
    pub fn free_space(&self) -> Option<Result<u64, std::io::Error>> {
        let file = self.shared.segments.as_deref()?;
        Some(
            rustix::fs::fstatvfs(file)
                .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
                .map_err(std::io::Error::from),
        )
    }

    /// A value stored with [`Self::meta_put`].
    pub fn meta_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let value = self.shared.meta.get(user_key(key)).map_err(io("read node metadata"))?;
        Ok(value.map(|v| v.to_vec()))
    }

    /// Stores a small value durably: it is on disk when this returns. Blocking (one flush).
    pub fn meta_put(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.shared.meta.insert(user_key(key), value).map_err(io("write node metadata"))?;
        self.shared.flush_now("flush node metadata")?;
        Ok(())
    }
}

fn user_key(key: &[u8]) -> Vec<u8> {
    [USER_PREFIX, key].concat()
}

/// Deliberate bugs, for the simulator to show that its checkers catch them. Compiled only with the
/// `planted-bugs` feature, and off until switched on.
#[cfg(feature = "planted-bugs")]
pub mod planted {
    use std::sync::atomic::{AtomicBool, Ordering};

    static KEEP_CONFLICTING_ENTRIES: AtomicBool = AtomicBool::new(false);

    /// The classic Raft bug: a follower neither truncates its log nor overwrites entries that conflict
    /// with the leader's, so an entry of a deposed leader survives where the new leader wrote another.
    pub fn keep_conflicting_entries(on: bool) {
        KEEP_CONFLICTING_ENTRIES.store(on, Ordering::SeqCst);
    }

    pub(crate) fn keeps_conflicting_entries() -> bool {
        KEEP_CONFLICTING_ENTRIES.load(Ordering::SeqCst)
    }

    static CONFIRM_FROM_STALE_ACKS: AtomicBool = AtomicBool::new(false);

    /// A leader confirms its leadership from any quorum acknowledgement it ever had, not only from
    /// one of AppendEntries sent after it was asked (`LogNode::confirm_quorum`): a leader cut off from
    /// everyone still confirms, and a fence relying on it would serve on.
    pub fn confirm_from_stale_acks(on: bool) {
        CONFIRM_FROM_STALE_ACKS.store(on, Ordering::SeqCst);
    }

    pub(crate) fn confirms_from_stale_acks() -> bool {
        CONFIRM_FROM_STALE_ACKS.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_of_format_1_is_read_with_no_handover_under_way() {
        let mut v1 = coyote_state_machine::StateV1::default();
        v1.departed.insert(7);
        v1.last_applied = 0;
        let data = encode(&SnapshotFile::V1(SnapshotBodyV1 {
            last_applied: None,
            last_membership: StoredMembership::default(),
            state: v1,
            archive: Vec::new(),
        }));
        let body = SnapshotBody::decode(&data, "a format 1 snapshot").expect("format 1 is read");
        assert!(body.state.departed.contains(&7));
        assert!(body.state.handovers.is_empty());
        // And what is written now is format 2, read back as it was.
        let again = encode(&SnapshotFile::V2(body));
        let back = SnapshotBody::decode(&again, "a format 2 snapshot").expect("format 2 is read");
        assert!(back.state.departed.contains(&7));
    }

    /// Event counts whose sum overflows a u64: the check added them unchecked (a panic in a debug
    /// build), reached by the `snapshot` fuzz target. It is an inconsistent snapshot.
    #[test]
    fn a_snapshot_whose_counts_overflow_is_refused() {
        let state = State { applied_count: u64::MAX, rejected_count: 1, ..State::default() };
        let body = SnapshotBody {
            last_applied: None,
            last_membership: StoredMembership::default(),
            state,
            archive: Vec::new(),
        };
        let meta =
            Meta { last_log_id: None, last_membership: StoredMembership::default(), snapshot_id: "x".into() };
        let data = body.encode();
        let body = SnapshotBody::decode(&data, "a snapshot").expect("it decodes");
        let error = body.check(&meta, "a snapshot").expect_err("it is refused").to_string();
        assert!(error.contains("more events than a u64 holds"), "{error}");
    }
}
