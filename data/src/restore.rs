//! Writing a snapshot back as a directory tree.
//!
//! [`restore`] never writes over anything: it refuses a target that exists, writes the tree into a
//! sibling temporary directory (`TARGET.restoring-RANDOM`), and renames that into place only when
//! everything is written and fsynced. On any error the temporary directory is removed and the
//! target stays absent, so a half-restored tree is never mistaken for data.
//!
//! Every chunk is checked against its hash ([`ChunkStore::get`]) and its length in the manifest.
//! Paths from the manifest are validated again (relative, normal components only, every parent a
//! directory of the snapshot), files are created exclusively without following links, and owners
//! and times are set on open descriptors or without following links, so a hostile manifest cannot
//! make a restore write outside its temporary directory.
//!
//! Owners are set only when the process runs as root; otherwise files belong to the restoring user.
//! A directory's mode and modification time are set after its contents are written.
//!
//! [`restore_with_base`] takes a tree restored earlier from another snapshot, left untouched since
//! (a failover's ready copy): a file whose content and attributes the two manifests describe alike
//! is hard-linked from it instead of written again, so a restore costs what changed. It may also
//! leave syncing to the caller (`sync: false`): a copy kept ready for later is synced once, with
//! [`sync_restored`], when it is put to use.

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps, CWD};

use crate::chunks::{sync_dir, ChunkId, ChunkStore};
use crate::error::{rio, Error, Result};
use crate::manifest::{check_path, show_path, Attrs, Entry, EntryKind, Manifest};

/// What a restore wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Regular files written.
    pub files: u64,
    /// Directories created (not counting the top one).
    pub dirs: u64,
    /// Symbolic links created.
    pub symlinks: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Whether owners were set (only when running as root).
    pub owners_set: bool,
    /// Regular files hard-linked from the base tree instead of written (counted in `files` too).
    pub linked: u64,
}

/// A tree restored earlier from `manifest` and untouched since, whose unchanged files a restore may
/// link instead of writing them.
#[derive(Debug, Clone, Copy)]
pub struct Base<'a> {
    pub manifest: &'a Manifest,
    pub dir: &'a Path,
}

/// The chunks of `manifest` that `store` lacks: what a restore would still have to fetch from
/// another holder.
pub fn missing(store: &ChunkStore, manifest: &Manifest) -> Vec<ChunkId> {
    manifest.chunks().into_iter().filter(|id| !store.contains(id)).collect()
}

/// Restores snapshot `snapshot_id` from `store` as a new directory `target`. See the
/// [module documentation](self).
pub fn restore(store: &ChunkStore, snapshot_id: &ChunkId, target: impl AsRef<Path>) -> Result<RestoreReport> {
    restore_with_base(store, snapshot_id, target, None, true)
}

/// Makes a tree restored with `sync: false` durable: syncs the file system that holds it (one call,
/// however many files), then its parent directory.
pub fn sync_restored(path: &Path) -> Result<()> {
    let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| rio(path, e))?;
    rustix::fs::syncfs(&fd).map_err(|e| rio(path, e))?;
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
        _ => Ok(()),
    }
}

/// [`restore`], linking the files that `base` holds unchanged instead of writing them. See the
/// [module documentation](self).
pub fn restore_with_base(
    store: &ChunkStore,
    snapshot_id: &ChunkId,
    target: impl AsRef<Path>,
    base: Option<Base<'_>>,
    sync: bool,
) -> Result<RestoreReport> {
    let target = target.as_ref();
    if fs::symlink_metadata(target).is_ok() {
        return Err(Error::TargetExists { path: target.to_path_buf() });
    }
    let name = match target.file_name() {
        Some(name) => name,
        None => {
            return Err(Error::BadPath { path: target.to_path_buf(), reason: "no file name to restore to" })
        }
    };
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };

    let manifest = Manifest::load(store, snapshot_id)?;
    manifest.validate()?;
    let lacking = missing(store, &manifest);
    if let Some(first) = lacking.first() {
        return Err(Error::MissingChunks { count: lacking.len(), first: *first });
    }

    let tmp = make_temp_dir(&parent, name)?;
    let as_root = rustix::process::geteuid().is_root();
    let mut report = RestoreReport { owners_set: as_root, ..RestoreReport::default() };
    let written = write_tree(store, &manifest, &tmp, as_root, base, sync, &mut report)
        .and_then(|()| rename_noreplace(&tmp, target))
        .and_then(|()| if sync { sync_dir(&parent) } else { Ok(()) });
    match written {
        Ok(()) => Ok(report),
        Err(e) => {
            // The rename is the last step that can fail before the target exists; after it
            // only the parent's fsync remains, whose failure leaves a complete target.
            if fs::symlink_metadata(&tmp).is_ok() {
                remove_tree(&tmp);
            }
            Err(e)
        }
    }
}

/// Creates `PARENT/NAME.restoring-RANDOM`, private to this user while it is written.
fn make_temp_dir(parent: &Path, name: &OsStr) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    for _ in 0..16 {
        let mut seed = Vec::new();
        seed.extend_from_slice(&std::process::id().to_le_bytes());
        seed.extend_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        seed.extend_from_slice(&now.to_le_bytes());
        let random = ChunkId::of(&seed).to_hex();
        let mut tmp_name = name.to_os_string();
        tmp_name.push(".restoring-");
        tmp_name.push(random.get(..16).unwrap_or(&random));
        let tmp = parent.join(tmp_name);
        match DirBuilder::new().mode(0o700).create(&tmp) {
            Ok(()) => return Ok(tmp),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&tmp, e)),
        }
    }
    Err(Error::BadPath { path: parent.to_path_buf(), reason: "cannot find a free temporary name" })
}

fn write_tree(
    store: &ChunkStore,
    manifest: &Manifest,
    tmp: &Path,
    as_root: bool,
    base: Option<Base<'_>>,
    sync: bool,
    report: &mut RestoreReport,
) -> Result<()> {
    let before: std::collections::HashMap<&[u8], &Entry> = base
        .map(|b| b.manifest.entries().iter().map(|e| (e.path.as_slice(), e)).collect())
        .unwrap_or_default();
    let mut dirs: Vec<(PathBuf, Attrs)> = Vec::new();
    for entry in manifest.entries() {
        let path = entry_path(tmp, entry)?;
        if let (Some(base), EntryKind::File { .. }) = (base, &entry.kind) {
            if before.get(entry.path.as_slice()).is_some_and(|old| *old == entry)
                && link_from(base.dir, entry, &path)
            {
                report.files += 1;
                report.linked += 1;
                continue;
            }
        }
        match &entry.kind {
            EntryKind::Dir => {
                DirBuilder::new().mode(0o700).create(&path).map_err(|e| Error::io(&path, e))?;
                dirs.push((path, entry.attrs));
                report.dirs += 1;
            }
            EntryKind::File { chunks, .. } => {
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(OFlags::NOFOLLOW.bits() as i32)
                    .open(&path)
                    .map_err(|e| Error::io(&path, e))?;
                for c in chunks {
                    let data = store.get(&c.id)?;
                    if data.len() != c.len as usize {
                        return Err(Error::corrupt(
                            c.id,
                            format!("{} bytes, the manifest says {}", data.len(), c.len),
                        ));
                    }
                    file.write_all(&data).map_err(|e| Error::io(&path, e))?;
                    report.bytes += data.len() as u64;
                }
                set_attrs_fd(&file, &path, &entry.attrs, as_root)?;
                if sync {
                    file.sync_all().map_err(|e| Error::io(&path, e))?;
                }
                report.files += 1;
            }
            EntryKind::Symlink { target } => {
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &path)
                    .map_err(|e| Error::io(&path, e))?;
                if as_root {
                    rustix::fs::chownat(
                        CWD,
                        &path,
                        Some(uid(entry.attrs.uid)),
                        Some(gid(entry.attrs.gid)),
                        AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(|e| rio(&path, e))?;
                }
                rustix::fs::utimensat(CWD, &path, &timestamps(&entry.attrs), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| rio(&path, e))?;
                report.symlinks += 1;
            }
        }
    }
    // Deepest first, so a directory's time is set after everything inside it is finished.
    for (path, attrs) in dirs.iter().rev() {
        finish_dir(path, attrs, as_root, sync)?;
    }
    finish_dir(tmp, manifest.root(), as_root, sync)
}

/// Hard-links `entry`'s file from the base tree `dir` to `path`; false when the base does not hold it
/// as a regular file with the entry's size (then the file is written instead).
fn link_from(dir: &Path, entry: &Entry, path: &Path) -> bool {
    let Ok(old) = entry_path(dir, entry) else { return false };
    let EntryKind::File { size, .. } = &entry.kind else { return false };
    match fs::symlink_metadata(&old) {
        Ok(md) if md.is_file() && md.len() == *size => fs::hard_link(&old, path).is_ok(),
        _ => false,
    }
}

/// Removes a tree [`restore`] wrote, whatever the modes of its directories. Best effort.
pub fn remove_restored(path: &Path) {
    remove_tree(path)
}

/// The entry's path inside `tmp`, after checking the manifest path once more.
fn entry_path(tmp: &Path, entry: &Entry) -> Result<PathBuf> {
    check_path(&entry.path)
        .map_err(|reason| Error::manifest(format!("{}: {reason}", show_path(&entry.path))))?;
    let path = tmp.join(entry.path());
    if !path.starts_with(tmp) || path.components().count() <= tmp.components().count() {
        return Err(Error::manifest(format!("{}: leads outside the restore", show_path(&entry.path))));
    }
    Ok(path)
}

/// Owner (as root), mode and time of a directory, then its fsync (with `sync`).
fn finish_dir(path: &Path, attrs: &Attrs, as_root: bool, sync: bool) -> Result<()> {
    let fd = rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| rio(path, e))?;
    set_attrs_fd(&fd, path, attrs, as_root)?;
    if sync {
        rustix::fs::fsync(&fd).map_err(|e| rio(path, e))?;
    }
    Ok(())
}

/// Owner first (a change of owner clears set-id bits), then mode, then times.
fn set_attrs_fd<Fd: AsFd>(fd: Fd, path: &Path, attrs: &Attrs, as_root: bool) -> Result<()> {
    if as_root {
        rustix::fs::fchown(&fd, Some(uid(attrs.uid)), Some(gid(attrs.gid))).map_err(|e| rio(path, e))?;
    }
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(attrs.mode)).map_err(|e| rio(path, e))?;
    rustix::fs::futimens(&fd, &timestamps(attrs)).map_err(|e| rio(path, e))
}

fn uid(raw: u32) -> rustix::fs::Uid {
    // The manifest refuses -1, the one value that means "leave unchanged".
    rustix::fs::Uid::from_raw_unchecked(raw)
}

fn gid(raw: u32) -> rustix::fs::Gid {
    rustix::fs::Gid::from_raw_unchecked(raw)
}

fn timestamps(attrs: &Attrs) -> Timestamps {
    let t = Timespec { tv_sec: attrs.mtime.secs, tv_nsec: i64::from(attrs.mtime.nanos) as _ };
    Timestamps { last_access: t, last_modification: t }
}

/// Renames `from` to `to` unless `to` exists (renameat2 RENAME_NOREPLACE; on a file system without
/// it, a check and a plain rename).
fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    match rustix::fs::renameat_with(CWD, from, CWD, to, rustix::fs::RenameFlags::NOREPLACE) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Err(Error::TargetExists { path: to.to_path_buf() }),
        Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::NOSYS) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(Error::TargetExists { path: to.to_path_buf() });
            }
            fs::rename(from, to).map_err(|e| Error::io(to, e))
        }
        Err(e) => Err(rio(to, e)),
    }
}

/// Removes a tree this module wrote, making its directories writable first (a restored directory
/// may have a mode that forbids removing its entries). Best effort: errors are ignored.
pub(crate) fn remove_tree(path: &Path) {
    let Ok(md) = fs::symlink_metadata(path) else { return };
    if md.is_dir() {
        let _ = rustix::fs::chmod(path, Mode::from_raw_mode(0o700));
        if let Ok(entries) = fs::read_dir(path) {
            for entry in entries.flatten() {
                remove_tree(&entry.path());
            }
        }
        let _ = fs::remove_dir(path);
    } else {
        let _ = fs::remove_file(path);
    }
}
