//! The store (the Raft log in files, the rest in sled): openraft's conformance suite, durability across reopening, snapshot transfer, and
//! refusal of damaged or foreign directories.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use coyote_log::store::{self, EventRecord, LogStore, StateMachineStore, StoreError, StoreHandle};
use coyote_log::types::{Batch, Committed};
use coyote_log::types::{Entry, LogId, StorageError, TypeConfig};
use coyote_state_machine::{Event, NodeInfo, Outcome, Proposal};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{
    BasicNode, CommittedLeaderId, EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder, Vote,
};
use tempfile::TempDir;

// ---- helpers ----

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64, payload: EntryPayload<TypeConfig>) -> Entry {
    Entry { log_id: log_id(term, index), payload }
}

fn proposal(event: Event) -> EntryPayload<TypeConfig> {
    batch(vec![event])
}

/// One entry carrying several proposals (group commit).
fn batch(events: Vec<Event>) -> EntryPayload<TypeConfig> {
    EntryPayload::Normal(Batch(
        events.into_iter().map(|event| Proposal { at_ms: 1_000, actor: "test".into(), event }).collect(),
    ))
}

fn membership(term: u64, index: u64) -> Entry {
    let nodes = BTreeMap::from([(1, BasicNode::new("127.0.0.1:7001"))]);
    let config = vec![BTreeSet::from([1])];
    entry(term, index, EntryPayload::Membership(Membership::new(config, nodes)))
}

/// A short history: membership, a blank, the cluster's creation, a token, then one entry holding a
/// rejected revocation and a second token. Four events in five entries.
fn history() -> Vec<Entry> {
    vec![
        membership(1, 1),
        entry(1, 2, EntryPayload::Blank),
        entry(
            1,
            3,
            proposal(Event::ClusterCreated {
                cluster_id: "c-test".into(),
                node: NodeInfo { id: 1, addr: "127.0.0.1:7001".into() },
                ca_pin: "ab".repeat(32),
            }),
        ),
        entry(
            2,
            4,
            proposal(Event::TokenIssued {
                token_id: "t1".into(),
                secret_sha256: "cd".repeat(32),
                expires_at_ms: 10_000,
                uses: 1,
            }),
        ),
        entry(
            2,
            5,
            batch(vec![
                Event::TokenRevoked { token_id: "no-such-token".into() },
                Event::TokenIssued {
                    token_id: "t2".into(),
                    secret_sha256: "ef".repeat(32),
                    expires_at_ms: 10_000,
                    uses: 1,
                },
            ]),
        ),
    ]
}

fn open(path: &Path) -> (LogStore, StateMachineStore, StoreHandle) {
    store::open(path).unwrap_or_else(|e| panic!("open failed: {e}"))
}

fn all_events(handle: &StoreHandle) -> Vec<EventRecord> {
    handle.events(0, usize::MAX).expect("read events")
}

// ---- openraft's conformance suite ----

struct FreshStore;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for FreshStore {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new().expect("create a temporary directory");
        let (log, sm, _handle) = open(dir.path());
        Ok((dir, log, sm))
    }
}

/// `Suite::test_all` makes its own tokio runtime per case, so this is a plain test.
#[test]
fn openraft_storage_suite() {
    Suite::test_all(FreshStore).expect("openraft's storage suite");
}

// ---- our own ----

#[tokio::test]
async fn log_vote_and_commit_survive_reopening() {
    let dir = TempDir::new().unwrap();
    let entries = history();
    {
        let (mut log, _sm, _handle) = open(dir.path());
        // Two calls: one batch of three, then two more.
        log.blocking_append(entries[..3].to_vec()).await.unwrap();
        log.blocking_append(entries[3..].to_vec()).await.unwrap();
        log.save_vote(&Vote::new(2, 1)).await.unwrap();
        log.save_committed(Some(log_id(2, 4))).await.unwrap();
    }
    let (mut log, _sm, _handle) = open(dir.path());
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries);
    assert_eq!(log.try_get_log_entries(2..4).await.unwrap(), entries[1..3].to_vec());
    assert_eq!(log.try_get_log_entries(4..=u64::MAX).await.unwrap(), entries[3..].to_vec());
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(2, 1)));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 4)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(2, 5)));
    assert_eq!(state.last_purged_log_id, None);

    // Truncation and purging survive too.
    log.truncate(log_id(2, 5)).await.unwrap();
    log.purge(log_id(1, 2)).await.unwrap();
    drop(log);
    drop((_sm, _handle));
    let (mut log, _sm, _handle) = open(dir.path());
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[2..4].to_vec());
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(2, 4)));
}

#[tokio::test]
async fn the_leaders_own_entries_become_durable_after_the_callback_and_survive() {
    let dir = TempDir::new().unwrap();
    let entries = history();
    {
        let (mut log, mut sm, handle) = open(dir.path());
        log.set_node_id(1);
        // A follower (the vote is for node 2): durable before the callback.
        log.save_vote(&Vote::new_committed(1, 2)).await.unwrap();
        log.blocking_append(entries[..3].to_vec()).await.unwrap();
        assert_eq!(handle.durable().borrow().index, 3);
        // The leader of term 2: flushed in the background, durable soon after the callback.
        log.save_vote(&Vote::new_committed(2, 1)).await.unwrap();
        log.blocking_append(entries[3..].to_vec()).await.unwrap();
        let mut durable = handle.durable();
        let reached =
            tokio::time::timeout(std::time::Duration::from_secs(10), durable.wait_for(|d| d.index >= 5));
        assert!(!reached.await.expect("the background flush finishes").expect("store open").failed);
        // Applying waits for durability, then goes through.
        sm.apply(entries.clone()).await.unwrap();
        assert_eq!(handle.last_event(), 4);
        // A truncation resets what counts as durable to what is left.
        log.truncate(log_id(2, 5)).await.unwrap();
        assert_eq!(handle.durable().borrow().index, 4);
    }
    let (mut log, _sm, handle) = open(dir.path());
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[..4].to_vec());
    assert_eq!(handle.durable().borrow().index, 4);
}

#[tokio::test]
async fn apply_archives_events_and_publishes_progress() {
    let dir = TempDir::new().unwrap();
    let (_log, mut sm, handle) = open(dir.path());
    let mut progress = handle.subscribe();
    let responses = sm.apply(history()).await.unwrap();
    assert_eq!(responses.len(), 5, "one response per entry");
    assert_eq!(responses[0], [], "a membership entry is not an event");
    assert_eq!(responses[1], [], "a blank entry is not an event");
    assert_eq!(responses[2], [Committed { index: 1, outcome: Outcome::Applied }]);
    assert_eq!(responses[3], [Committed { index: 2, outcome: Outcome::Applied }]);
    let [rejected, issued] = responses[4].as_slice() else { panic!("two outcomes: {:?}", responses[4]) };
    assert_eq!(rejected.index, 3);
    assert!(matches!(&rejected.outcome, Outcome::Rejected { reason } if reason.contains("does not exist")));
    assert_eq!(*issued, Committed { index: 4, outcome: Outcome::Applied }, "a rejection spares the rest");

    assert!(progress.has_changed().unwrap());
    assert_eq!(*progress.borrow_and_update(), 5);
    assert_eq!(handle.last_applied(), 5);

    let events = all_events(&handle);
    let indexes: Vec<u64> = events.iter().map(|r| r.envelope.index).collect();
    assert_eq!(indexes, [1, 2, 3, 4], "event indexes are dense, not log indexes");
    assert_eq!(events[1].envelope.term, 2);
    assert_eq!(events[2].outcome, rejected.outcome);
    assert_eq!(handle.events(2, 1).unwrap(), events[1..2].to_vec());
    assert_eq!(handle.events(5, 10).unwrap(), []);
    assert_eq!(handle.last_event(), 4);

    handle.with_state(|state| {
        assert_eq!(state.cluster.as_ref().map(|c| c.id.as_str()), Some("c-test"));
        assert!(state.tokens.contains_key("t1") && state.tokens.contains_key("t2"));
        assert_eq!((state.applied_count, state.rejected_count), (3, 1));
    });
    let (applied, members) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(2, 5)));
    assert_eq!(members.log_id(), &Some(log_id(1, 1)));
}

#[tokio::test]
async fn a_snapshot_installed_elsewhere_gives_the_same_state_and_archive() {
    let (dir_a, dir_b) = (TempDir::new().unwrap(), TempDir::new().unwrap());
    let (_log_a, mut sm_a, handle_a) = open(dir_a.path());
    sm_a.apply(history()).await.unwrap();
    let snapshot = sm_a.get_snapshot_builder().await.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(2, 5)));

    let (_log_b, mut sm_b, handle_b) = open(dir_b.path());
    let mut received = sm_b.begin_receiving_snapshot().await.unwrap();
    received.get_mut().extend_from_slice(snapshot.snapshot.get_ref());
    sm_b.install_snapshot(&snapshot.meta, received).await.unwrap();

    let state_a = handle_a.with_state(|s| s.clone());
    assert_eq!(handle_b.with_state(|s| s.clone()), state_a);
    assert_eq!(all_events(&handle_b), all_events(&handle_a));
    assert_eq!(handle_b.last_applied(), 5);
    assert_eq!(sm_b.applied_state().await.unwrap(), sm_a.applied_state().await.unwrap());
    let current = sm_b.get_current_snapshot().await.unwrap().expect("installed snapshot is current");
    assert_eq!(current.meta, snapshot.meta);

    // The installed snapshot is what a restart of B starts from.
    drop((_log_b, sm_b, handle_b));
    let (_log_b, mut sm_b, handle_b) = open(dir_b.path());
    assert_eq!(handle_b.with_state(|s| s.clone()), state_a);
    assert_eq!(all_events(&handle_b), all_events(&handle_a));
    assert_eq!(sm_b.applied_state().await.unwrap().0, Some(log_id(2, 5)));
    assert_eq!(handle_b.last_applied(), 5);
}

#[tokio::test]
async fn reopening_starts_from_the_snapshot_and_replays_the_rest() {
    let dir = TempDir::new().unwrap();
    let entries = history();
    let snapshot_state;
    {
        let (mut log, mut sm, handle) = open(dir.path());
        log.blocking_append(entries.clone()).await.unwrap();
        sm.apply(entries[..4].to_vec()).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        snapshot_state = handle.with_state(|s| s.clone());
        sm.apply(entries[4..].to_vec()).await.unwrap();
        assert_eq!(all_events(&handle).len(), 4);
    }
    let (mut log, mut sm, handle) = open(dir.path());
    assert_eq!(sm.applied_state().await.unwrap().0, Some(log_id(2, 4)));
    assert_eq!(handle.with_state(|s| s.clone()), snapshot_state);
    // The events of entry 5 are on disk but not applied yet: readers do not see them.
    assert_eq!(all_events(&handle).len(), 2);

    // What openraft does next: re-apply the entries after the snapshot.
    let rest = log.try_get_log_entries(5..).await.unwrap();
    sm.apply(rest).await.unwrap();
    assert_eq!(all_events(&handle).len(), 4);
    assert_eq!(handle.last_applied(), 5);
}

#[tokio::test]
async fn open_rebuilds_an_archive_a_crash_left_behind_the_snapshot() {
    let dir = TempDir::new().unwrap();
    let expected;
    {
        let (_log, mut sm, handle) = open(dir.path());
        sm.apply(history()).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        expected = all_events(&handle);
    }
    {
        let db = raw_sled(dir.path());
        let events = db.open_tree("events").unwrap();
        events.remove(4u64.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }
    let (_log, _sm, handle) = open(dir.path());
    assert_eq!(all_events(&handle), expected);
}

/// `count` entries after a membership entry, each holding one event: the cluster's creation, then
/// tokens.
fn many_events(count: u64) -> Vec<Entry> {
    let mut entries = vec![membership(1, 1)];
    for i in 0..count {
        let event = match i {
            0 => Event::ClusterCreated {
                cluster_id: "c-many".into(),
                node: NodeInfo { id: 1, addr: "127.0.0.1:7001".into() },
                ca_pin: "ab".repeat(32),
            },
            _ => Event::TokenIssued {
                token_id: format!("t{i}"),
                secret_sha256: "cd".repeat(32),
                expires_at_ms: 10_000,
                uses: 1,
            },
        };
        entries.push(entry(1, i + 2, proposal(event)));
    }
    entries
}

fn events_in_tree(path: &Path) -> usize {
    raw_sled(path).open_tree("events").unwrap().len()
}

#[tokio::test]
async fn applied_events_reach_the_archive_in_batches_and_survive_reopening() {
    let dir = TempDir::new().unwrap();
    let count = 2 * store::ARCHIVE_BATCH as u64 + 100;
    let entries = many_events(count);
    let expected;
    {
        let (mut log, mut sm, handle) = open(dir.path());
        log.blocking_append(entries.clone()).await.unwrap();
        for chunk in entries.chunks(7) {
            sm.apply(chunk.to_vec()).await.unwrap();
        }
        expected = all_events(&handle);
        let indexes: Vec<u64> = expected.iter().map(|r| r.envelope.index).collect();
        assert_eq!(indexes, (1..=count).collect::<Vec<_>>(), "every applied event is readable at once");
        assert!(
            matches!(&expected[5].envelope.event, Event::TokenIssued { token_id, .. } if token_id == "t5")
        );
        // Reads that cross from the tree to the events still in memory.
        let across = handle.events(1000, 60).unwrap();
        assert_eq!(across, expected[999..1059].to_vec());
    }
    // Written when a batch's worth waited (checked after each apply, so a batch may be a few more).
    let in_tree = events_in_tree(dir.path());
    assert!(
        (2 * store::ARCHIVE_BATCH..count as usize).contains(&in_tree),
        "{in_tree} of {count} events in the tree: the last ones wait in memory for a full batch"
    );

    // No snapshot: the state starts empty and openraft re-applies the whole log, which rebuilds the
    // archive exactly.
    {
        let (mut log, mut sm, handle) = open(dir.path());
        assert_eq!(all_events(&handle), [], "the state has applied nothing yet");
        let stored = log.try_get_log_entries(1..).await.unwrap();
        sm.apply(stored).await.unwrap();
        assert_eq!(all_events(&handle), expected);
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
    }
    assert_eq!(events_in_tree(dir.path()), count as usize, "building a snapshot writes every event");
    let (_log, _sm, handle) = open(dir.path());
    assert_eq!(all_events(&handle), expected, "the snapshot's archive is what a restart reads");
}

#[tokio::test]
#[should_panic(expected = "broke the cluster state")]
async fn a_broken_invariant_stops_the_node() {
    let dir = TempDir::new().unwrap();
    let (_log, mut sm, _handle) = open(dir.path());
    let entries = history();
    sm.apply(entries.clone()).await.unwrap();
    // The same entry again: the log went backwards, which is a bug, hence a panic.
    sm.apply(vec![entries[2].clone()]).await.unwrap();
}

#[test]
fn node_metadata_is_durable() {
    let dir = TempDir::new().unwrap();
    {
        let (_log, _sm, handle) = open(dir.path());
        assert_eq!(handle.meta_get(b"cluster-id").unwrap(), None);
        handle.meta_put(b"cluster-id", b"c-test").unwrap();
        // Our keys cannot reach Raft's.
        handle.meta_put(b"raft/vote", b"garbage").unwrap();
    }
    let (_log, _sm, handle) = open(dir.path());
    assert_eq!(handle.meta_get(b"cluster-id").unwrap().as_deref(), Some(&b"c-test"[..]));
}

/// Pseudo-random bytes, reproducible.
fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) as u8
        })
        .collect()
}

/// Opens `dir` expecting a clean `StoreError::Open` naming the directory, not a panic.
fn expect_refused(dir: &Path, case: &str) -> String {
    let result = std::panic::catch_unwind(|| store::open(dir).map(drop));
    let result = result.unwrap_or_else(|_| panic!("{case}: opening panicked"));
    let error = result.expect_err(case);
    assert!(matches!(error, StoreError::Open { .. }), "{case}: {error}");
    let message = error.to_string();
    assert!(message.starts_with("cannot open the store at "), "{case}: {message}");
    assert!(message.contains(&dir.display().to_string()), "{case}: {message}");
    message
}

#[test]
fn garbage_in_the_directory_is_an_error_not_a_panic() {
    let cases: [&[(&str, usize)]; 6] = [
        &[("db", 4096)],
        &[("db", 17)],
        &[("conf", 512)],
        &[("conf", 3)],
        &[("conf", 300), ("db", 70_000)],
        &[("notes.txt", 10)],
    ];
    for files in cases {
        let dir = TempDir::new().unwrap();
        for &(file, len) in files {
            std::fs::write(dir.path().join(file), noise(len, len as u64)).unwrap();
        }
        expect_refused(dir.path(), &format!("garbage {files:?}"));
        // sled must not have "recovered" the garbage into an empty database over it.
        for &(file, len) in files {
            let now = std::fs::metadata(dir.path().join(file)).unwrap().len() as usize;
            assert_eq!(now, len, "{files:?}: {file} was rewritten");
        }
    }
}

#[tokio::test]
async fn a_store_whose_database_file_was_damaged_is_refused() {
    for damage in ["overwritten", "emptied"] {
        let dir = TempDir::new().unwrap();
        {
            let (mut log, _sm, _handle) = open(dir.path());
            log.blocking_append(history()).await.unwrap();
            log.save_vote(&Vote::new(2, 1)).await.unwrap();
        }
        let db_file = dir.path().join("db");
        let len = std::fs::metadata(&db_file).unwrap().len() as usize;
        let garbage = if damage == "overwritten" { noise(len, 7) } else { Vec::new() };
        std::fs::write(&db_file, garbage).unwrap();
        // Either sled reports the damage, or it starts an empty database, which lacks our marker.
        expect_refused(dir.path(), damage);
    }
}

#[test]
fn a_new_store_is_created_in_an_absent_or_empty_directory() {
    let parent = TempDir::new().unwrap();
    let nested = parent.path().join("a").join("store");
    drop(open(&nested));
    drop(open(&nested));
    let empty = TempDir::new().unwrap();
    drop(open(empty.path()));
    drop(open(empty.path()));
    // No staging directory is left behind.
    let names: Vec<_> =
        std::fs::read_dir(parent.path().join("a")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["store"]);
}

#[test]
fn a_sled_database_of_another_program_is_refused() {
    let dir = TempDir::new().unwrap();
    {
        let db = raw_sled(dir.path());
        db.insert(b"something", b"else").unwrap();
        db.flush().unwrap();
    }
    let error = store::open(dir.path()).map(drop).expect_err("foreign database");
    assert!(error.to_string().contains("without a coyote format marker"), "{error}");
}

#[tokio::test]
async fn a_damaged_raft_log_is_refused_with_the_place_named() {
    let dir = TempDir::new().unwrap();
    {
        let (mut log, _sm, _handle) = open(dir.path());
        log.blocking_append(history()).await.unwrap();
        log.save_vote(&Vote::new(2, 1)).await.unwrap();
    }
    let segment = dir.path().join("raft-log").join("0000000000000001.seg");
    let mut bytes = std::fs::read(&segment).unwrap();
    // A byte in the middle of the log (the header is 32 bytes, the first record follows).
    bytes[40] ^= 0x40;
    std::fs::write(&segment, &bytes).unwrap();
    let message = expect_refused(dir.path(), "damaged log");
    assert!(message.contains("0000000000000001.seg at offset 32"), "{message}");
    assert!(message.contains("checksum does not match"), "{message}");
}

#[test]
fn a_store_without_its_raft_log_is_refused() {
    let dir = TempDir::new().unwrap();
    drop(open(dir.path()));
    std::fs::remove_dir_all(dir.path().join("raft-log")).unwrap();
    let message = expect_refused(dir.path(), "no log");
    assert!(message.contains("raft-log"), "{message}");
}

#[tokio::test]
async fn a_store_of_the_format_before_is_migrated() {
    let dir = TempDir::new().unwrap();
    let entries = history();
    {
        // What coyote-store/2 wrote: the log and the vote in sled.
        let db = raw_sled(dir.path());
        db.insert(b"coyote/store-format", &b"coyote-store/2"[..]).unwrap();
        let log = db.open_tree("log").unwrap();
        for entry in &entries[1..] {
            log.insert(entry.log_id.index.to_be_bytes(), coyote_state_machine::encode(entry)).unwrap();
        }
        let meta = db.open_tree("meta").unwrap();
        meta.insert(b"raft/vote", coyote_state_machine::encode(&Vote::<u64>::new_committed(2, 1))).unwrap();
        meta.insert(b"raft/committed", coyote_state_machine::encode(&Some(log_id(2, 4)))).unwrap();
        meta.insert(b"raft/last-purged", coyote_state_machine::encode(&log_id(1, 1))).unwrap();
        meta.insert(b"user/kept", &b"mine"[..]).unwrap();
        db.flush().unwrap();
    }
    {
        let (mut log, _sm, handle) = open(dir.path());
        check_migrated(&mut log, &handle, &entries).await;
    }
    // Migrated once: the second open reads the new format.
    let (mut log, _sm, handle) = open(dir.path());
    check_migrated(&mut log, &handle, &entries).await;
    drop((log, _sm, handle));
    let db = raw_sled(dir.path());
    assert_eq!(db.get(b"coyote/store-format").unwrap().as_deref(), Some(&b"coyote-store/3"[..]));
    assert!(!db.tree_names().iter().any(|n| &n[..] == b"log"));
}

async fn check_migrated(log: &mut LogStore, handle: &StoreHandle, entries: &[Entry]) {
    assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[1..].to_vec());
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new_committed(2, 1)));
    assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 4)));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 1)));
    assert_eq!(state.last_log_id, Some(log_id(2, 5)));
    assert_eq!(handle.meta_get(b"kept").unwrap().as_deref(), Some(&b"mine"[..]));
}

#[test]
fn a_store_of_an_unknown_format_is_refused() {
    let dir = TempDir::new().unwrap();
    {
        let db = raw_sled(dir.path());
        db.insert(b"coyote/store-format", &b"coyote-store/9"[..]).unwrap();
        db.flush().unwrap();
    }
    let message = expect_refused(dir.path(), "format 9");
    assert!(message.contains("coyote-store/9"), "{message}");
}

/// Opens the store's sled database directly. sled releases its file lock a moment after the last
/// handle is dropped (its flusher thread exits asynchronously), so retry briefly on that error.
fn raw_sled(path: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e)
                if std::time::Instant::now() < deadline
                    && e.to_string().contains("could not acquire lock") =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("opening {}: {e}", path.display()),
        }
    }
}
