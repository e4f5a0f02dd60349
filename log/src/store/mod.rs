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
//!
//! # Files
//!
//! - `mod.rs`: opening a store ([`open`], [`open_memory`]), the state shared by the three handles, and
//!   [`StoreHandle`].
//! - `format.rs`: pointing sled at a directory safely, the format marker, creating a store, migrating
//!   the format before.
//! - `flush.rs`: syncs, the leader's deferred flush and [`Durable`].
//! - `archive.rs`: [`EventRecord`] and the `events` tree.
//! - `snapshot.rs`: the snapshot's encoding and checks; building, saving and installing it.
//! - `raft.rs`: openraft's storage traits ([`LogStore`], [`StateMachineStore`]).
//! - [`StoreError`] lives in `crate::error`, which the file log uses too.

mod archive;
mod flush;
mod format;
mod raft;
mod snapshot;

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use coyote_state_machine::State;
use openraft::{SnapshotMeta, StoredMembership, Vote};
use tokio::sync::watch;

use crate::filelog::{FileLog, Medium, MemorySegments};
use crate::types::{LogId, Node, NodeId};

pub use crate::error::StoreError;
pub(crate) use crate::error::{decode_from_disk, inconsistent, io};
pub(crate) use archive::read_event_record;
use archive::*;
pub use archive::{EventRecord, ARCHIVE_BATCH};
pub use flush::Durable;
use flush::*;
use format::*;
pub use raft::{LogStore, StateMachineStore};
pub(crate) use snapshot::SnapshotBody;

/// Snapshot metadata, as openraft defines it for our types.
type Meta = SnapshotMeta<NodeId, Node>;
const META_TREE: &str = "meta";
const EVENTS_TREE: &str = "events";
const SNAPSHOT_TREE: &str = "snapshot";
/// The subdirectory of the store that holds the Raft log's segments.
pub const RAFT_LOG_DIR: &str = "raft-log";
/// Prefix of the keys written through [`StoreHandle::meta_put`].
const USER_PREFIX: &[u8] = b"user/";

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

    /// Tells subscribers the last applied index, if it moved.
    fn publish(&self, last_index: u64) {
        self.applied_tx.send_if_modified(|published| std::mem::replace(published, last_index) != last_index);
    }
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
