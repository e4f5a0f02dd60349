//! A full disk under the store: a snapshot that does not fit fails with a clear error, leaves no
//! temporary file, and the chunks and snapshots stored before are intact.
//!
//! The disk is a small tmpfs mounted for the test, which needs root: the test fails without it
//! rather than pass having tested nothing (CI runs as root). To run the rest without root:
//! `cargo test -p coyote-data -- --skip full_disk`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{compare_trees, tmp_files, write, Compare, Rng};
use coyote_data::{restore, snapshot, ChunkStore, Error, MetaCache};

/// A tmpfs mounted at a fresh directory, unmounted on drop.
struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    fn mount(root: &Path, size: &str) -> SmallDisk {
        const NEEDS_ROOT: &str = "this test needs root to mount a tmpfs; to run the rest without it: \
                                  cargo test -p coyote-data -- --skip full_disk";
        assert!(common::is_root(), "{NEEDS_ROOT}");
        let path = root.join("disk");
        fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount ({NEEDS_ROOT}): {e}"));
        assert!(
            out.status.success(),
            "cannot mount a tmpfs at {} ({NEEDS_ROOT}): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        SmallDisk { path }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}

#[test]
fn full_disk_fails_cleanly_and_keeps_earlier_chunks() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(tmp.path(), "2m");
    let store_root = disk.path.join("store");
    let store = ChunkStore::open(&store_root).unwrap();
    let mut rng = Rng::new(21);

    // An earlier snapshot that fits.
    let small = tmp.path().join("small");
    write(&small.join("a"), &rng.bytes(200_000));
    write(&small.join("b/c"), &rng.bytes(50_000));
    let mut cache = MetaCache::new();
    let earlier = snapshot(&small, &mut cache, &store).unwrap();
    let chunks_before = store.list().unwrap();

    let big = tmp.path().join("big");
    write(&big.join("data"), &rng.bytes(4 << 20));

    // With a reserve, the store refuses before the disk fills up, and writes nothing.
    let free = store.free_bytes().unwrap();
    let reserved = ChunkStore::open(&store_root).unwrap().with_reserve(free.saturating_sub(10_000));
    match snapshot(&big, &mut MetaCache::new(), &reserved) {
        Err(Error::DiskReserve { free: f, reserve }) => {
            assert!(f <= free && reserve == free.saturating_sub(10_000))
        }
        other => panic!("a snapshot beyond the reserve: {other:?}"),
    }
    assert_eq!(tmp_files(&store_root), 0);
    assert_eq!(store.list().unwrap(), chunks_before, "a chunk was written beyond the reserve");

    // Without one, a 4 MiB incompressible file does not fit on a 2 MiB disk.
    match snapshot(&big, &mut MetaCache::new(), &store) {
        Err(Error::DiskFull { path }) => {
            assert!(path.starts_with(&store_root), "the error names a path in the store: {}", path.display());
        }
        other => panic!("a snapshot larger than the disk: {other:?}"),
    }
    assert_eq!(tmp_files(&store_root), 0, "a partial chunk was left in tmp/");

    // Whatever was stored is whole, the earlier snapshot among it.
    let report = store.verify().unwrap();
    assert!(report.corrupt.is_empty(), "damaged chunks after the full disk: {:?}", report.corrupt);
    for id in &chunks_before {
        store.get_with_limit(id, coyote_data::MAX_OBJECT_BYTES).unwrap();
    }
    let dst = tmp.path().join("restored");
    restore(&store, &earlier.id, &dst).unwrap();
    compare_trees(&small, &dst, Compare { mtime_ns: true, owners: true, top: true });

    drop(disk);
}
