//! A snapshot restored is the tree it was taken of: contents, kinds, link targets, modes,
//! modification times to the nanosecond, and owners when running as root.

mod common;

use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use common::{compare_trees, is_root, set_mode, set_mtime, write, Compare, Rng};
use coyote_data::{restore, snapshot, ChunkStore, Error, Manifest, MetaCache};

/// Builds the test tree under `root`: nested directories, an empty directory, empty files, a
/// 3 MiB random file, symbolic links (relative, absolute, dangling), modes 0600/0755/0750/0700,
/// a non-UTF-8 name, and set times everywhere (directories last, deepest first).
fn build_tree(root: &Path) {
    let mut rng = Rng::new(1);
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(root.join("empty-dir")).unwrap();
    write(&root.join("empty.txt"), b"");
    write(&root.join("a/b/empty-too"), b"");
    write(&root.join("a/b/c/random.bin"), &rng.bytes(3 << 20));
    write(&root.join("a/small.txt"), b"hello\n");
    write(&root.join("a/secret"), b"private");
    write(&root.join("a/script.sh"), b"#!/bin/sh\necho hi\n");
    write(&root.join(std::ffi::OsStr::from_bytes(b"not-utf8-\xff\xfe")), b"bytes");
    std::os::unix::fs::symlink("a/b/c/random.bin", root.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", root.join("a/link-abs")).unwrap();

    set_mode(&root.join("a/secret"), 0o600);
    set_mode(&root.join("a/script.sh"), 0o755);
    set_mode(&root.join("a/b"), 0o750);
    set_mode(&root.join("empty-dir"), 0o700);

    if is_root() {
        rustix::fs::chownat(
            rustix::fs::CWD,
            root.join("a/secret"),
            Some(rustix::fs::Uid::from_raw(1234)),
            Some(rustix::fs::Gid::from_raw(5678)),
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
        rustix::fs::chownat(
            rustix::fs::CWD,
            root.join("a/link-abs"),
            Some(rustix::fs::Uid::from_raw(42)),
            Some(rustix::fs::Gid::from_raw(43)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }

    let mut t = 1_600_000_000i64;
    for rel in [
        "empty.txt",
        "a/b/empty-too",
        "a/b/c/random.bin",
        "a/small.txt",
        "a/secret",
        "a/script.sh",
        "link-rel",
        "a/link-abs",
    ] {
        t += 1000;
        set_mtime(&root.join(rel), t, 123_456_789);
    }
    set_mtime(&root.join(std::ffi::OsStr::from_bytes(b"not-utf8-\xff\xfe")), 1_500_000_000, 1);
    for (i, rel) in ["a/b/c", "a/b", "a", "empty-dir"].iter().enumerate() {
        set_mtime(&root.join(rel), 1_700_000_000 + i as i64, 987_654_321);
    }
    set_mtime(root, 1_700_000_100, 5);
}

#[test]
fn snapshot_then_restore_gives_the_same_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    build_tree(&src);
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();

    let mut cache = MetaCache::new();
    let report = snapshot(&src, &mut cache, &store).unwrap();
    assert_eq!(report.files, 7);
    assert_eq!(report.changed_files, 7);
    assert_eq!(report.bytes, (3 << 20) + 6 + 7 + 18 + 5);
    assert_eq!(report.skipped_special, 0);
    assert!(report.new_bytes >= 3 << 20, "the random file's chunks are new: {report:?}");

    let manifest = Manifest::load(&store, &report.id).unwrap();
    assert_eq!(manifest.total_bytes(), report.bytes);
    assert!(manifest.chunks().len() >= (3 << 20) / coyote_data::CDC_MAX, "the 3 MiB file is cut in chunks");

    let dst = tmp.path().join("restored");
    let restored = restore(&store, &report.id, &dst).unwrap();
    assert_eq!(restored.files, 7);
    assert_eq!(restored.symlinks, 2);
    assert_eq!(restored.dirs, 4);
    assert_eq!(restored.owners_set, is_root());
    let compared = compare_trees(&src, &dst, Compare { mtime_ns: true, owners: is_root(), top: true });
    assert_eq!(compared, 13);
    assert!(common::temp_dirs(tmp.path()).is_empty());

    // A restore never writes over anything.
    match restore(&store, &report.id, &dst) {
        Err(Error::TargetExists { path }) => assert_eq!(path, dst),
        other => panic!("restore over an existing target: {other:?}"),
    }
    assert!(common::temp_dirs(tmp.path()).is_empty());
}

#[test]
fn special_files_are_skipped_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    write(&src.join("file"), b"x");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(src.join("sock")).unwrap();
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();

    let report = snapshot(&src, &mut MetaCache::new(), &store).unwrap();
    assert_eq!(report.files, 1);
    assert_eq!(report.skipped_special, 2);
    let manifest = Manifest::load(&store, &report.id).unwrap();
    let paths: Vec<&[u8]> = manifest.entries().iter().map(|e| e.path.as_slice()).collect();
    assert_eq!(paths, vec![b"file".as_slice()]);
}

#[test]
fn a_snapshot_of_something_that_is_not_a_directory_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    write(&tmp.path().join("file"), b"x");
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let err = snapshot(tmp.path().join("file"), &mut MetaCache::new(), &store).unwrap_err();
    assert!(matches!(err, Error::BadPath { .. }), "{err}");
    let err = snapshot(tmp.path().join("absent"), &mut MetaCache::new(), &store).unwrap_err();
    assert!(err.to_string().contains("absent"), "the error names the path: {err}");
}
