//! Restores of snapshots that cannot or must not be restored: hostile manifests from another node,
//! missing and damaged chunks. Each fails with an error and leaves neither the target nor a
//! temporary directory, and nothing is written outside the restore.

mod common;

use std::fs;
use std::path::Path;

use common::{temp_dirs, Rng};
use coyote_data::{
    missing, restore, snapshot, Attrs, ChunkId, ChunkRef, ChunkStore, Entry, EntryKind, Error, Manifest,
    MetaCache, Timestamp,
};
use serde::Serialize;

/// The manifest's encoded layout, without its checks: what a hostile node could send.
#[derive(Serialize)]
struct RawManifest {
    root: Attrs,
    entries: Vec<Entry>,
}

fn attrs() -> Attrs {
    Attrs { mode: 0o755, uid: 0, gid: 0, mtime: Timestamp { secs: 1_600_000_000, nanos: 0 } }
}

fn encode_raw(entries: Vec<Entry>) -> Vec<u8> {
    let mut out = vec![coyote_data::manifest::FORMAT_VERSION];
    out.extend(
        bincode::serde::encode_to_vec(RawManifest { root: attrs(), entries }, bincode::config::standard())
            .unwrap(),
    );
    out
}

fn file(store: &ChunkStore, path: &str, content: &[u8]) -> Entry {
    let id = store.put(content).unwrap().id;
    Entry {
        path: path.as_bytes().to_vec(),
        kind: EntryKind::File {
            size: content.len() as u64,
            chunks: vec![ChunkRef { id, len: content.len() as u32 }],
        },
        attrs: attrs(),
    }
}

fn dir(path: &str) -> Entry {
    Entry { path: path.as_bytes().to_vec(), kind: EntryKind::Dir, attrs: attrs() }
}

fn link(path: &str, target: &str) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind: EntryKind::Symlink { target: target.as_bytes().to_vec() },
        attrs: attrs(),
    }
}

fn assert_refused(store: &ChunkStore, bytes: &[u8], parent: &Path, name: &str, expect: &str) {
    assert!(
        matches!(Manifest::decode(bytes), Err(Error::InvalidManifest { .. })),
        "{name}: decode accepted it"
    );
    let id = store.put(bytes).unwrap().id;
    let target = parent.join(name);
    match restore(store, &id, &target) {
        Err(e @ Error::InvalidManifest { .. }) => assert!(e.to_string().contains(expect), "{name}: {e}"),
        other => panic!("{name}: restore did not refuse: {other:?}"),
    }
    assert!(fs::symlink_metadata(&target).is_err(), "{name}: the target exists");
    assert_eq!(temp_dirs(parent), Vec::<std::path::PathBuf>::new(), "{name}: a temporary directory is left");
}

#[test]
fn hostile_manifests_are_refused_by_decode_and_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();

    let escape = format!("{}/x", outside.display());
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("dotdot", encode_raw(vec![file(&store, "../x", b"evil")]), "`..` component"),
        ("dotdot-inside", encode_raw(vec![dir("a"), file(&store, "a/../../x", b"evil")]), "`..` component"),
        ("absolute", encode_raw(vec![file(&store, &escape, b"evil")]), "absolute path"),
        ("unsorted", encode_raw(vec![file(&store, "b", b"1"), file(&store, "a", b"2")]), "sorted"),
        ("duplicate", encode_raw(vec![file(&store, "a", b"1"), file(&store, "a", b"1")]), "sorted"),
        (
            "through-a-link",
            encode_raw(vec![link("a", outside.to_str().unwrap()), file(&store, "a/x", b"evil")]),
            "parent is not a directory",
        ),
        (
            "huge-size",
            encode_raw(vec![Entry {
                path: b"big".to_vec(),
                kind: EntryKind::File {
                    size: 1 << 50,
                    chunks: vec![ChunkRef { id: store.put(b"tiny").unwrap().id, len: 4 }],
                },
                attrs: attrs(),
            }]),
            "not the sum",
        ),
        (
            "truncated",
            {
                let mut b = encode_raw(vec![dir("a"), file(&store, "a/x", b"data")]);
                b.truncate(b.len() - 10);
                b
            },
            "cannot decode",
        ),
        ("garbage", b"\x01\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff".to_vec(), "invalid manifest"),
    ];
    for (name, bytes, expect) in cases {
        assert_refused(&store, &bytes, &out, name, expect);
    }
    assert!(fs::read_dir(&outside).unwrap().next().is_none(), "something was written outside");
    assert!(fs::read_dir(&out).unwrap().next().is_none(), "something was left in the parent");
}

#[test]
fn a_snapshot_id_that_is_not_a_manifest_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let id = store.put(&Rng::new(1).bytes(10_000)).unwrap().id;
    let target = tmp.path().join("target");
    assert!(matches!(restore(&store, &id, &target), Err(Error::InvalidManifest { .. })));
    assert!(matches!(restore(&store, &ChunkId([1; 32]), &target), Err(Error::MissingChunk { .. })));
    assert!(fs::symlink_metadata(&target).is_err());
    assert!(temp_dirs(tmp.path()).is_empty());
}

#[test]
fn hostile_manifest_indexes_are_refused() {
    use coyote_data::manifest::{INDEX_VERSION, PART_MAX};
    use coyote_data::ChunkRef;
    let tmp = tempfile::tempdir().unwrap();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let index = |parts: &[ChunkRef], trailing: &[u8]| {
        let mut out = vec![INDEX_VERSION];
        out.extend(bincode::serde::encode_to_vec(parts, bincode::config::standard()).unwrap());
        out.extend_from_slice(trailing);
        store.put(&out).unwrap().id
    };
    let good = encode_raw(vec![dir("a")]);
    let part = store.put(&good).unwrap().id;
    let garbage = store.put(&Rng::new(3).bytes(3000)).unwrap().id;
    let len = good.len() as u32;
    let cases: Vec<(&str, ChunkId, &str)> = vec![
        ("trailing", index(&[ChunkRef { id: part, len }], b"x"), "trailing bytes after the index"),
        ("empty part", index(&[ChunkRef { id: part, len: 0 }], b""), "outside 1..="),
        ("huge part", index(&[ChunkRef { id: part, len: PART_MAX as u32 + 1 }], b""), "outside 1..="),
        ("wrong length", index(&[ChunkRef { id: part, len: len - 1 }], b""), "decompresses to more"),
        ("short part", index(&[ChunkRef { id: part, len: len + 1 }], b""), "the index says"),
        ("garbage", index(&[ChunkRef { id: garbage, len: 3000 }], b""), "format version"),
        ("no parts", index(&[], b""), "empty"),
    ];
    for (name, id, expect) in cases {
        match Manifest::load(&store, &id) {
            Err(e @ (Error::InvalidManifest { .. } | Error::Corrupt { .. })) => {
                assert!(e.to_string().contains(expect), "{name}: {e}")
            }
            other => panic!("{name}: accepted or refused for another reason: {other:?}"),
        }
        let target = tmp.path().join(name);
        assert!(restore(&store, &id, &target).is_err(), "{name}");
        assert!(fs::symlink_metadata(&target).is_err(), "{name}: the target exists");
    }
    // A part that is not in the store.
    let id = index(&[ChunkRef { id: ChunkId([9; 32]), len: 10 }], b"");
    assert!(matches!(Manifest::load(&store, &id), Err(Error::MissingChunk { .. })));
    // The same manifest through a good index loads.
    let id = index(&[ChunkRef { id: part, len }], b"");
    assert_eq!(Manifest::load(&store, &id).unwrap().entries().len(), 1);
    assert_eq!(Manifest::parts(&store, &id).unwrap(), vec![part]);
}

/// Makes the locked directories writable again so the temporary directory can be removed when the
/// tests run as a user other than root.
fn unlock(tmp: &Path) {
    for dir in ["src/locked", "target/locked"] {
        if tmp.join(dir).is_dir() {
            common::set_mode(&tmp.join(dir), 0o700);
        }
    }
}

fn snapshot_of_two_files(tmp: &Path) -> (ChunkStore, ChunkId, Manifest) {
    let src = tmp.join("src");
    fs::create_dir_all(src.join("sub")).unwrap();
    let mut rng = Rng::new(4);
    fs::write(src.join("sub/one"), rng.bytes(600_000)).unwrap();
    fs::write(src.join("two"), rng.bytes(300_000)).unwrap();
    // A directory the restoring user cannot write into once its mode is set.
    fs::create_dir(src.join("locked")).unwrap();
    fs::write(src.join("locked/inner"), b"inner").unwrap();
    common::set_mode(&src.join("locked"), 0o500);
    let store = ChunkStore::open(tmp.join("store")).unwrap();
    let report = snapshot(&src, &mut MetaCache::new(), &store).unwrap();
    let manifest = Manifest::load(&store, &report.id).unwrap();
    (store, report.id, manifest)
}

#[test]
fn a_missing_chunk_fails_the_restore_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, id, manifest) = snapshot_of_two_files(tmp.path());
    assert!(missing(&store, &manifest).is_empty());
    let chunks = manifest.chunks();
    let gone = chunks[chunks.len() / 2];
    // Another node holds the chunk; this one loses it.
    let holder = ChunkStore::open(tmp.path().join("holder")).unwrap();
    holder.put_compressed(&gone, &store.get_compressed(&gone).unwrap()).unwrap();
    store.remove(&gone).unwrap();
    assert_eq!(missing(&store, &manifest), vec![gone]);

    let target = tmp.path().join("target");
    match restore(&store, &id, &target) {
        Err(Error::MissingChunks { count: 1, first }) => assert_eq!(first, gone),
        other => panic!("restore without a chunk: {other:?}"),
    }
    assert!(fs::symlink_metadata(&target).is_err());
    assert!(temp_dirs(tmp.path()).is_empty());

    // Fetched from the holder, the chunk makes the restore work.
    let shipped = holder.get_compressed(&gone).unwrap();
    store.put_compressed(&gone, &shipped).unwrap();
    restore(&store, &id, &target).unwrap();
    common::compare_trees(
        &tmp.path().join("src"),
        &target,
        common::Compare { mtime_ns: true, owners: common::is_root(), top: true },
    );
    unlock(tmp.path());
}

#[test]
fn a_damaged_chunk_fails_the_restore_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, id, manifest) = snapshot_of_two_files(tmp.path());
    // The last chunk of the last file, so most of the tree is written when the damage is found,
    // including the locked directory.
    let last = manifest
        .entries()
        .iter()
        .filter_map(|e| match &e.kind {
            EntryKind::File { chunks, .. } if e.path == b"two" => chunks.last().map(|c| c.id),
            _ => None,
        })
        .next()
        .unwrap();
    common::flip_byte(&store.chunk_path(&last));

    let target = tmp.path().join("target");
    match restore(&store, &id, &target) {
        Err(Error::Corrupt { id, .. }) => assert_eq!(id, last),
        other => panic!("restore with a damaged chunk: {other:?}"),
    }
    assert!(fs::symlink_metadata(&target).is_err());
    assert!(temp_dirs(tmp.path()).is_empty());
    unlock(tmp.path());
}
