//! A snapshot exported as tar is read by GNU tar: `tar -t` lists every path, and `tar -x` gives a
//! tree that `diff -r` finds equal to the original, with the same modes and modification times.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{compare_trees, set_mode, set_mtime, write, Compare, Rng};
use coyote_data::{export_tar, snapshot, ChunkStore, EntryKind, Error, Manifest, MetaCache};

fn tree(root: &Path) {
    let mut rng = Rng::new(31);
    let long_dir = "d".repeat(120);
    let long_name = format!("{long_dir}/{}", "f".repeat(150));
    write(&root.join(&long_name), &rng.bytes(70_000));
    write(&root.join("a/b/c/data.bin"), &rng.bytes(1 << 20));
    write(&root.join("a/empty"), b"");
    write(&root.join("text.txt"), b"some text\n");
    write(&root.join("exec"), b"#!/bin/sh\n");
    fs::create_dir(root.join("empty-dir")).unwrap();
    std::os::unix::fs::symlink("a/b/c/data.bin", root.join("link")).unwrap();
    std::os::unix::fs::symlink(format!("{long_dir}/{}", "x".repeat(150)), root.join("long-link")).unwrap();
    write(&root.join(std::ffi::OsStr::from_bytes(b"bytes-\xff")), b"non-UTF-8 name");
    set_mode(&root.join("exec"), 0o755);
    set_mode(&root.join("text.txt"), 0o600);
    set_mode(&root.join("a/b"), 0o750);
    for (i, rel) in ["a/b/c/data.bin", "a/empty", "text.txt", "exec", "link", &long_name].iter().enumerate() {
        set_mtime(&root.join(rel), 1_600_000_000 + i as i64 * 77, 0);
    }
    for rel in ["a/b/c", "a/b", "a", "empty-dir", &long_dir] {
        set_mtime(&root.join(rel), 1_650_000_000, 0);
    }
}

#[test]
fn gnu_tar_lists_and_extracts_the_export() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    tree(&src);
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let report = snapshot(&src, &mut MetaCache::new(), &store).unwrap();

    let tar_path = tmp.path().join("snapshot.tar");
    export_tar(&store, &report.id, fs::File::create(&tar_path).unwrap()).unwrap();

    // tar -t lists every path of the snapshot, and the top directory.
    let listed =
        Command::new("tar").arg("--quoting-style=literal").arg("-tf").arg(&tar_path).output().unwrap();
    assert!(listed.status.success(), "tar -t: {}", String::from_utf8_lossy(&listed.stderr));
    let names: BTreeSet<Vec<u8>> = listed
        .stdout
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| l.strip_suffix(b"/").unwrap_or(l).to_vec())
        .collect();
    let mut expected: BTreeSet<Vec<u8>> = common::walk(&src).into_keys().collect();
    expected.insert(b".".to_vec());
    assert_eq!(
        names.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect::<Vec<_>>(),
        expected.iter().map(|n| String::from_utf8_lossy(n).into_owned()).collect::<Vec<_>>(),
    );

    // tar -x, streaming from export_tar through a pipe, gives the same tree.
    let out = tmp.path().join("out");
    fs::create_dir(&out).unwrap();
    let mut child = Command::new("tar").arg("-x").arg("-C").arg(&out).stdin(Stdio::piped()).spawn().unwrap();
    export_tar(&store, &report.id, child.stdin.take().unwrap()).unwrap();
    assert!(child.wait().unwrap().success(), "tar -x failed");
    let diff = Command::new("diff").arg("-r").arg("--no-dereference").arg(&src).arg(&out).output().unwrap();
    assert!(
        diff.status.success(),
        "diff -r found differences:\n{}{}",
        String::from_utf8_lossy(&diff.stdout),
        String::from_utf8_lossy(&diff.stderr)
    );
    // tar keeps whole seconds; modes, times and (as root, which tar -x preserves) owners match.
    compare_trees(&src, &out, Compare { mtime_ns: false, owners: common::is_root(), top: true });
}

#[test]
fn export_of_a_damaged_snapshot_fails_with_the_chunk() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir(&src).unwrap();
    write(&src.join("f"), &Rng::new(1).bytes(100_000));
    let store = ChunkStore::open(tmp.path().join("store")).unwrap();
    let report = snapshot(&src, &mut MetaCache::new(), &store).unwrap();
    let manifest = Manifest::load(&store, &report.id).unwrap();
    let EntryKind::File { chunks, .. } = &manifest.entries()[0].kind else { panic!("not a file") };
    store.remove(&chunks[0].id).unwrap();
    match export_tar(&store, &report.id, Vec::new()) {
        Err(Error::MissingChunk { id }) => assert_eq!(id, chunks[0].id),
        other => panic!("export without a chunk: {other:?}"),
    }
}
