//! Incremental snapshots: an unchanged file is not read again, a small change stores little, and
//! the cache survives a save and load (and a damaged cache only costs a full read).

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{compare_trees, settle, write, Compare, Rng};
use coyote_data::{capture, restore, snapshot, ChunkStore, EntryKind, Manifest, MetaCache};

const BIG: usize = 8 << 20;

fn tree(root: &Path, rng: &mut Rng) {
    write(&root.join("big.db"), &rng.bytes(BIG));
    for i in 0..5 {
        write(&root.join(format!("dir{i}/small-{i}.txt")), &rng.bytes(1000 + i * 300));
    }
}

fn overwrite(path: &Path, offset: u64, data: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(data, offset).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn small_changes_store_little_and_unchanged_files_are_not_read() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut rng = Rng::new(7);
    tree(&src, &mut rng);
    settle();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let mut cache = MetaCache::new();

    let first = snapshot(&src, &mut cache, &store).unwrap();
    assert_eq!(first.files, 6);
    assert_eq!(first.changed_files, 6);
    assert_eq!(cache.len(), 6, "every file settled, so the cache vouches for all of them");

    // Nothing changed: no file is read, nothing is new, and the snapshot is the same one.
    let second = snapshot(&src, &mut cache, &store).unwrap();
    assert_eq!(second.changed_files, 0, "{second:?}");
    assert_eq!(second.new_bytes, 0);
    assert_eq!(second.stored_bytes, 0);
    assert_eq!(second.id, first.id);
    assert_eq!(second.bytes, first.bytes);

    // 1% of the big file, one contiguous run.
    let run = BIG / 100;
    overwrite(&src.join("big.db"), 3 << 20, &rng.bytes(run));
    let third = snapshot(&src, &mut cache, &store).unwrap();
    assert_eq!(third.changed_files, 1, "{third:?}");
    assert!(third.new_bytes > 0);
    assert!(
        third.new_bytes < (BIG as u64) * 15 / 100,
        "a contiguous 1% change stored {} bytes",
        third.new_bytes
    );

    // 1% of the big file again, as scattered 4 KiB pages (as a database writes): each page
    // dirties the chunk around it, so more is new than for one run.
    let pages = BIG / 100 / 4096;
    for _ in 0..pages {
        let page = rng.below((BIG / 4096) as u64);
        overwrite(&src.join("big.db"), page * 4096, &rng.bytes(4096));
    }
    let fourth = snapshot(&src, &mut cache, &store).unwrap();
    assert_eq!(fourth.changed_files, 1, "{fourth:?}");
    // With chunks of 64 KiB on average, 20 scattered pages dirty about 20 chunks: some 16% of
    // the file; storing the whole file again would be 100%.
    assert!(
        fourth.new_bytes < (BIG as u64) * 30 / 100,
        "{pages} scattered pages stored {} bytes",
        fourth.new_bytes
    );

    // Bytes inserted in the middle shift everything after them; content-defined chunking finds
    // the same cut points again a little later, so only the chunks around the insertion are new.
    let mut content = fs::read(src.join("big.db")).unwrap();
    content.splice(BIG / 2..BIG / 2, rng.bytes(100));
    write(&src.join("big.db"), &content);
    let fifth = snapshot(&src, &mut cache, &store).unwrap();
    assert_eq!(fifth.changed_files, 1);
    assert!(
        fifth.new_bytes <= 3 * coyote_data::CDC_MAX as u64,
        "an insertion of 100 bytes stored {} bytes",
        fifth.new_bytes
    );

    // The last snapshot restores to the tree as it is now.
    let dst = tmp.path().join("restored");
    restore(&store, &fifth.id, &dst).unwrap();
    compare_trees(&src, &dst, Compare { mtime_ns: true, owners: false, top: true });
}

#[test]
fn the_cache_survives_save_and_load_and_a_damaged_cache_is_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src, &mut Rng::new(3));
    settle();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let cache_file = tmp.path().join("cache");

    assert!(MetaCache::load(&cache_file).is_empty(), "a missing cache file is an empty cache");
    let mut cache = MetaCache::new();
    snapshot(&src, &mut cache, &store).unwrap();
    cache.save(&cache_file).unwrap();
    let mut loaded = MetaCache::load(&cache_file);
    assert_eq!(loaded, cache);
    let again = snapshot(&src, &mut loaded, &store).unwrap();
    assert_eq!(again.changed_files, 0, "a loaded cache vouches like the one saved");

    for damage in [b"".to_vec(), b"\x01garbage".to_vec(), b"\x09".to_vec(), {
        let mut b = fs::read(&cache_file).unwrap();
        b.truncate(b.len() / 2);
        b
    }] {
        fs::write(&cache_file, &damage).unwrap();
        let mut damaged = MetaCache::load(&cache_file);
        assert!(damaged.is_empty());
        let report = snapshot(&src, &mut damaged, &store).unwrap();
        assert_eq!(report.changed_files, 6, "with no cache every file is read");
        assert_eq!(report.new_bytes, 0, "and every chunk is already stored");
    }
}

#[test]
fn a_cached_file_whose_chunk_was_removed_is_read_again() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src, &mut Rng::new(5));
    settle();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let mut cache = MetaCache::new();
    let first = snapshot(&src, &mut cache, &store).unwrap();

    let manifest = Manifest::load(&store, &first.id).unwrap();
    let small = manifest.entries().iter().find(|e| e.path == b"dir2/small-2.txt").unwrap();
    let EntryKind::File { chunks, .. } = &small.kind else { panic!("not a file") };
    assert_eq!(chunks.len(), 1);
    assert!(store.remove(&chunks[0].id).unwrap());

    let second = snapshot(&src, &mut cache, &store).unwrap();
    assert_eq!(second.changed_files, 1, "{second:?}");
    assert_eq!(second.new_bytes, u64::from(chunks[0].len));
    assert!(store.contains(&chunks[0].id));
}

#[test]
fn files_changed_just_before_a_capture_are_read_again_next_time() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src, &mut Rng::new(9));
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let mut cache = MetaCache::new();
    // Written just now: within the racy window, so the cache does not vouch for them yet.
    let first = snapshot(&src, &mut cache, &store).unwrap();
    assert_eq!(first.changed_files, 6);
    assert!(cache.is_empty(), "{} files cached although just written", cache.len());
    settle();
    let second = snapshot(&src, &mut cache, &store).unwrap();
    assert_eq!(second.changed_files, 6);
    assert_eq!(second.new_bytes, 0);
    assert_eq!(cache.len(), 6);
    let third = snapshot(&src, &mut cache, &store).unwrap();
    assert_eq!(third.changed_files, 0);
}

#[test]
fn capture_holds_new_chunks_until_commit() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    tree(&src, &mut Rng::new(11));
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let mut cache = MetaCache::new();

    let captured = capture(&src, &cache, &store).unwrap();
    assert!(captured.pending_bytes() >= BIG as u64);
    assert!(store.list().unwrap().is_empty(), "capture writes nothing to the store");
    let report = captured.commit(&store, &mut cache).unwrap();
    assert!(report.capture_elapsed > std::time::Duration::ZERO);
    assert!(report.stored_bytes > 0);
    assert_eq!(report.new_bytes, report.bytes, "random content: every chunk is new");

    // With a small memory bound, chunks beyond it are stored during the capture.
    let src2 = tmp.path().join("src2");
    tree(&src2, &mut Rng::new(12));
    let options = coyote_data::CaptureOptions { max_pending_bytes: 1 << 20 };
    let captured = coyote_data::capture_with(&src2, &cache, &store, &options).unwrap();
    assert!(captured.pending_bytes() <= 1 << 20);
    let before_commit = store.list().unwrap().len();
    let report2 = captured.commit(&store, &mut cache).unwrap();
    assert!(store.list().unwrap().len() > before_commit);
    assert_eq!(report2.new_bytes, report2.bytes);
    let dst = tmp.path().join("restored");
    restore(&store, &report2.id, &dst).unwrap();
    compare_trees(&src2, &dst, Compare { mtime_ns: true, owners: false, top: true });
}

/// A restore over a base tree (a failover's ready copy of the previous snapshot) links the files
/// that did not change and writes the others; the result equals the source all the same.
#[test]
fn a_restore_over_a_base_links_unchanged_files_and_writes_changed_ones() {
    use std::os::unix::fs::MetadataExt;
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut rng = Rng::new(11);
    tree(&src, &mut rng);
    settle();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let mut cache = MetaCache::new();
    let first = snapshot(&src, &mut cache, &store).unwrap();
    let ready = tmp.path().join("ready-1");
    restore(&store, &first.id, &ready).unwrap();

    overwrite(&src.join("big.db"), 1 << 20, &rng.bytes(4096));
    write(&src.join("dir0/new.txt"), b"new");
    fs::remove_file(src.join("dir4/small-4.txt")).unwrap();
    let second = snapshot(&src, &mut cache, &store).unwrap();
    let manifest = Manifest::load(&store, &first.id).unwrap();
    let next = tmp.path().join("ready-2");
    let base = coyote_data::Base { manifest: &manifest, dir: &ready };
    let report = coyote_data::restore_with_base(&store, &second.id, &next, Some(base), false).unwrap();
    coyote_data::sync_restored(&next).unwrap();
    assert_eq!(report.files, 6, "{report:?}");
    assert_eq!(report.linked, 4, "the four unchanged small files: {report:?}");
    assert_eq!(compare_trees(&src, &next, Compare { mtime_ns: true, owners: false, top: false }), 11);
    let inode = |p: &Path| fs::metadata(p).unwrap().ino();
    assert_eq!(inode(&ready.join("dir1/small-1.txt")), inode(&next.join("dir1/small-1.txt")));
    assert_ne!(inode(&ready.join("big.db")), inode(&next.join("big.db")));
    // The base may go: the new tree keeps its files.
    coyote_data::remove_restored(&ready);
    assert_eq!(compare_trees(&src, &next, Compare { mtime_ns: true, owners: false, top: false }), 11);
}

#[test]
fn a_small_change_in_a_large_tree_shares_most_of_the_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let mut rng = Rng::new(11);
    for i in 0..3000 {
        write(&src.join(format!("mail/{:02}/msg-{i:05}.eml", i % 30)), &rng.bytes(200 + i % 700));
    }
    settle();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let mut cache = MetaCache::new();
    let first = snapshot(&src, &mut cache, &store).unwrap();
    let first_parts = Manifest::parts(&store, &first.id).unwrap();
    assert!(first_parts.len() >= 10, "{} parts for 3000 files", first_parts.len());

    write(&src.join("mail/07/msg-new.eml"), &rng.bytes(500));
    let second = snapshot(&src, &mut cache, &store).unwrap();
    let second_parts = Manifest::parts(&store, &second.id).unwrap();
    let new_parts = second_parts.iter().filter(|p| !first_parts.contains(p)).count();
    assert!(new_parts <= 3, "{new_parts} of {} parts changed for one new file", second_parts.len());
    let dst = tmp.path().join("restored");
    restore(&store, &second.id, &dst).unwrap();
    compare_trees(&src, &dst, Compare { mtime_ns: true, owners: false, top: true });
}
