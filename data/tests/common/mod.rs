//! Helpers shared by the integration tests: random content, trees with set modes and times, and a
//! comparison of two trees entry by entry.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};

/// A small deterministic generator (xorshift64*), enough for incompressible test content.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Sets the modification (and access) time of `path` without following a symbolic link.
pub fn set_mtime(path: &Path, secs: i64, nanos: u32) {
    let t = Timespec { tv_sec: secs, tv_nsec: nanos.into() };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps { last_access: t, last_modification: t },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap_or_else(|e| panic!("utimensat {}: {e}", path.display()));
}

pub fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

pub fn write(path: &Path, data: &[u8]) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, data).unwrap();
}

/// Every entry below `root` (not `root` itself) by relative path, without following links.
pub fn walk(root: &Path) -> BTreeMap<Vec<u8>, PathBuf> {
    let mut out = BTreeMap::new();
    for entry in walkdir::WalkDir::new(root).follow_links(false).min_depth(1) {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(root).unwrap().as_os_str().as_bytes().to_vec();
        out.insert(rel, entry.path().to_path_buf());
    }
    out
}

/// What a tree comparison looks at.
#[derive(Clone, Copy)]
pub struct Compare {
    /// Compare modification times to the nanosecond (else to the second).
    pub mtime_ns: bool,
    /// Compare owner and group.
    pub owners: bool,
    /// Compare the top directories' mode and time too.
    pub top: bool,
}

/// Compares two trees entry by entry: the same paths, kinds, file contents, link targets, modes,
/// modification times and (if asked) owners. Panics naming the first difference; returns how many
/// entries were compared.
pub fn compare_trees(a: &Path, b: &Path, how: Compare) -> usize {
    let ta = walk(a);
    let tb = walk(b);
    let names_a: Vec<_> = ta.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    let names_b: Vec<_> = tb.keys().map(|k| String::from_utf8_lossy(k).into_owned()).collect();
    assert_eq!(names_a, names_b, "the trees hold different paths");
    if how.top {
        compare_entry(a, b, how);
    }
    for (rel, pa) in &ta {
        compare_entry(pa, &tb[rel], how);
    }
    ta.len()
}

fn compare_entry(pa: &Path, pb: &Path, how: Compare) {
    let ma = fs::symlink_metadata(pa).unwrap();
    let mb = fs::symlink_metadata(pb).unwrap();
    let what = pa.display();
    assert_eq!(ma.file_type(), mb.file_type(), "{what}: kind");
    if ma.file_type().is_file() {
        assert!(fs::read(pa).unwrap() == fs::read(pb).unwrap(), "{what}: content differs");
    }
    if ma.file_type().is_symlink() {
        assert_eq!(fs::read_link(pa).unwrap(), fs::read_link(pb).unwrap(), "{what}: link target");
    } else {
        assert_eq!(ma.mode() & 0o7777, mb.mode() & 0o7777, "{what}: mode");
    }
    assert_eq!(ma.mtime(), mb.mtime(), "{what}: mtime seconds");
    if how.mtime_ns {
        assert_eq!(ma.mtime_nsec(), mb.mtime_nsec(), "{what}: mtime nanoseconds");
    }
    if how.owners {
        assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "{what}: owner");
    }
}

/// Entries of `dir` whose names contain `.restoring-` (a restore's temporary directory).
pub fn temp_dirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().as_bytes().windows(11).any(|w| w == b".restoring-"))
        .collect()
}

/// The number of files in the store's `tmp/` directory.
pub fn tmp_files(store_root: &Path) -> usize {
    fs::read_dir(store_root.join("tmp")).unwrap().count()
}

/// Flips one bit in the middle of the file at `path`.
pub fn flip_byte(path: &Path) {
    let mut bytes = fs::read(path).unwrap();
    let i = bytes.len() / 2;
    bytes[i] ^= 0x40;
    // The chunk file is read-only to nobody but may be shared: write through a new file.
    let tmp = path.with_extension("flip");
    fs::write(&tmp, &bytes).unwrap();
    fs::rename(&tmp, path).unwrap();
}

/// Waits until files written now are older than the cache's racy window, so the next snapshot's
/// cache vouches for them.
pub fn settle() {
    std::thread::sleep(coyote_data::snapshot::RACY_WINDOW + std::time::Duration::from_millis(50));
}
