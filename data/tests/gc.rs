//! Garbage collection keeps what kept snapshots use and what is fresh, and removes the rest.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use common::{compare_trees, write, Compare, Rng};
use coyote_data::{gc, restore, snapshot, ChunkId, ChunkStore, Error, Manifest, MetaCache};

#[test]
fn gc_removes_what_only_dropped_snapshots_used() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut rng = Rng::new(41);
    write(&src.join("stays"), &rng.bytes(500_000));
    write(&src.join("changes"), &rng.bytes(500_000));
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let mut cache = MetaCache::new();
    let first = snapshot(&src, &mut cache, &store).unwrap();

    write(&src.join("changes"), &rng.bytes(400_000));
    write(&src.join("new"), &rng.bytes(100_000));
    let second = snapshot(&src, &mut cache, &store).unwrap();

    let m1: BTreeSet<ChunkId> = Manifest::load(&store, &first.id).unwrap().chunks().into_iter().collect();
    let m2: BTreeSet<ChunkId> = Manifest::load(&store, &second.id).unwrap().chunks().into_iter().collect();
    let only_first: BTreeSet<ChunkId> = m1.difference(&m2).copied().collect();
    assert!(!only_first.is_empty());
    assert!(m1.intersection(&m2).next().is_some(), "the unchanged file's chunks are shared");
    let all_before: BTreeSet<ChunkId> = store.list().unwrap().into_iter().collect();

    // Within the grace period nothing is removed.
    let report = gc(&store, &[second.id], Duration::from_secs(3600)).unwrap();
    assert_eq!(report.removed, 0);
    assert_eq!(report.kept as usize, all_before.len());

    // A snapshot's objects: its chunks, its manifest's index and the manifest's parts.
    let objects = |id: ChunkId, chunks: &BTreeSet<ChunkId>| {
        let mut all = chunks.clone();
        all.insert(id);
        all.extend(Manifest::parts(&store, &id).unwrap());
        all
    };
    let (o1, o2) = (objects(first.id, &m1), objects(second.id, &m2));
    assert_eq!(o1.union(&o2).count(), all_before.len());
    let report = gc(&store, &[second.id], Duration::ZERO).unwrap();
    assert_eq!(
        report.removed as usize,
        o1.difference(&o2).count(),
        "the first snapshot's own chunks, index and manifest parts"
    );
    assert!(report.removed_bytes > 0);
    assert_eq!(report.kept as usize, o2.len());
    let after: BTreeSet<ChunkId> = store.list().unwrap().into_iter().collect();
    assert_eq!(after, o2);
    assert!(!store.contains(&first.id));

    // The kept snapshot still restores.
    let dst = tmp.path().join("restored");
    restore(&store, &second.id, &dst).unwrap();
    compare_trees(&src, &dst, Compare { mtime_ns: true, owners: false, top: true });
}

#[test]
fn a_fresh_chunk_is_kept_within_the_grace_period() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src.join("f"), b"content");
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let snap = snapshot(&src, &mut MetaCache::new(), &store).unwrap();

    // A chunk arriving for a snapshot whose manifest is not there yet.
    let in_flight = store.put(&Rng::new(2).bytes(30_000)).unwrap().id;
    let report = gc(&store, &[snap.id], Duration::from_secs(60)).unwrap();
    assert_eq!(report.removed, 0);
    assert!(store.contains(&in_flight));

    // Once older than the grace period, it goes.
    std::thread::sleep(Duration::from_millis(50));
    let report = gc(&store, &[snap.id], Duration::from_millis(20)).unwrap();
    assert_eq!(report.removed, 1);
    assert!(!store.contains(&in_flight));
    assert!(store.contains(&snap.id));
}

#[test]
fn gc_removes_nothing_when_a_kept_snapshot_cannot_be_read() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write(&src.join("f"), &Rng::new(3).bytes(100_000));
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let snap = snapshot(&src, &mut MetaCache::new(), &store).unwrap();
    let before = store.list().unwrap();

    let absent = ChunkId([9; 32]);
    assert!(matches!(gc(&store, &[snap.id, absent], Duration::ZERO), Err(Error::MissingChunk { .. })));
    common::flip_byte(&store.chunk_path(&snap.id));
    assert!(matches!(gc(&store, &[snap.id], Duration::ZERO), Err(Error::Corrupt { .. })));
    assert_eq!(store.list().unwrap(), before);
    assert!(fs::metadata(store.chunk_path(&snap.id)).is_ok());
}
