//! Taking a snapshot of a directory, in two phases.
//!
//! The caller pauses the service's container for the first phase, so that phase does only what
//! must see a still tree, and the second phase does the rest with the container running again:
//!
//! 1. [`capture`] walks the directory (never following symbolic links, staying on one file
//!    system), `lstat`s every entry, and reads only the regular files that changed since the last
//!    snapshot according to the [`MetaCache`] (size, modification and change times in
//!    nanoseconds, inode). A changed file is cut into chunks by content-defined chunking
//!    ([`CDC_MIN`]/[`CDC_AVG`]/[`CDC_MAX`]) and each chunk hashed; chunks the store lacks are kept
//!    in memory, uncompressed, in the [`Capture`] (up to [`CaptureOptions::max_pending_bytes`];
//!    beyond it they are compressed and written to temporary files at once, which lengthens the
//!    pause but bounds memory).
//! 2. [`Capture::commit`] compresses and writes the chunks kept in memory, publishes them all as one
//!    [`Batch`] (so a snapshot costs a few file-system syncs, not two per chunk), stores the
//!    manifest, and updates the cache.
//!
//! [`snapshot`] does both in one call.
//!
//! Sockets, FIFOs and device nodes are skipped (and counted). Hard links are stored as separate
//! files. A directory on which another file system is mounted is recorded as an empty directory.
//!
//! The cache is trusted only for files whose change time is at least [`RACY_WINDOW`] older than the
//! start of the capture: a file written in the same clock tick as the capture read it could
//! otherwise change again, after the container resumes, without its times changing, and a later
//! snapshot would reuse the old chunks. Such a file is read again at the next snapshot.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fastcdc::v2020::StreamCDC;
use serde::{Deserialize, Serialize};

use crate::chunks::{sync_dir, Batch, ChunkId, ChunkStore, CDC_AVG, CDC_MAX, CDC_MIN, MAX_OBJECT_BYTES};
use crate::error::{Error, Result};
use crate::manifest::{Attrs, ChunkRef, Entry, EntryKind, Manifest, Timestamp, MODE_MASK};

/// How much older than the start of a capture a file's change time must be for the cache to vouch
/// for the file at the next snapshot. One second covers file systems that keep whole seconds.
pub const RACY_WINDOW: Duration = Duration::from_secs(1);

/// The format version written as the first byte of a saved [`MetaCache`].
const CACHE_VERSION: u8 = 1;

/// The largest cache file [`MetaCache::load`] reads.
const MAX_CACHE_BYTES: usize = 2 * MAX_OBJECT_BYTES;

/// What the cache remembers of a regular file from the last snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFile {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Change time, nanoseconds since the epoch.
    pub ctime_ns: i128,
    /// Inode number.
    pub ino: u64,
    /// The content as chunks.
    pub chunks: Vec<ChunkRef>,
}

impl CachedFile {
    /// Whether the chunk lengths are possible and add up to the size (a damaged cache file can
    /// decode to anything; such an entry is dropped).
    fn is_consistent(&self) -> bool {
        let mut sum = 0u64;
        for c in &self.chunks {
            if c.len == 0 || c.len as usize > crate::chunks::MAX_CHUNK_BYTES {
                return false;
            }
            sum = sum.saturating_add(u64::from(c.len));
        }
        sum == self.size
    }

    fn matches(&self, md: &Metadata) -> bool {
        self.size == md.size()
            && self.mtime_ns == mtime_ns(md)
            && self.ctime_ns == ctime_ns(md)
            && self.ino == md.ino()
    }
}

/// Per-file metadata and chunk lists from the last snapshot, keyed by relative path, so an
/// unchanged file costs one `lstat` and no read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaCache {
    files: HashMap<Vec<u8>, CachedFile>,
}

impl MetaCache {
    /// An empty cache: every file is read at the next snapshot.
    pub fn new() -> MetaCache {
        MetaCache::default()
    }

    /// Loads a cache saved by [`MetaCache::save`]. A missing, unreadable or damaged file gives an
    /// empty cache: the next snapshot then reads every file, which is slower but correct.
    pub fn load(path: impl AsRef<Path>) -> MetaCache {
        let Ok(bytes) = fs::read(path) else { return MetaCache::new() };
        let Some((&CACHE_VERSION, body)) = bytes.split_first() else { return MetaCache::new() };
        if body.len() > MAX_CACHE_BYTES {
            return MetaCache::new();
        }
        let config = bincode::config::standard().with_limit::<MAX_CACHE_BYTES>();
        match bincode::serde::decode_from_slice::<Vec<(Vec<u8>, CachedFile)>, _>(body, config) {
            Ok((files, read)) if read == body.len() => {
                MetaCache { files: files.into_iter().filter(|(_, f)| f.is_consistent()).collect() }
            }
            _ => MetaCache::new(),
        }
    }

    /// Saves the cache durably: a temporary file beside `path`, fsync, rename, fsync of the
    /// directory.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let mut files: Vec<(&Vec<u8>, &CachedFile)> = self.files.iter().collect();
        files.sort_by(|a, b| a.0.cmp(b.0));
        let body = bincode::serde::encode_to_vec(&files, bincode::config::standard())
            .map_err(|e| Error::io(path, io::Error::other(e)))?;
        let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
        tmp_name.push(format!(".tmp-{}", std::process::id()));
        let tmp = path.with_file_name(tmp_name);
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| Error::io(&tmp, e))?;
            f.write_all(&[CACHE_VERSION]).map_err(|e| Error::io(&tmp, e))?;
            f.write_all(&body).map_err(|e| Error::io(&tmp, e))?;
            f.sync_all().map_err(|e| Error::io(&tmp, e))?;
            fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
            _ => sync_dir(Path::new(".")),
        }
    }

    /// The cached entry for relative path `path`.
    pub fn get(&self, path: &[u8]) -> Option<&CachedFile> {
        self.files.get(path)
    }

    /// How many files the cache knows.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Whether the cache knows no file.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.files.clear();
    }
}

/// Options for [`capture_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureOptions {
    /// Uncompressed bytes of new chunks the capture may keep in memory; new chunks beyond it are
    /// compressed and stored during the capture.
    pub max_pending_bytes: usize,
}

impl Default for CaptureOptions {
    fn default() -> CaptureOptions {
        CaptureOptions { max_pending_bytes: 512 * 1024 * 1024 }
    }
}

/// The result of the first phase of a snapshot: the tree as it was, and the new chunks not yet
/// stored. Dropping it without [`Capture::commit`] stores nothing (and removes the temporary files
/// of chunks written because of the memory bound).
#[derive(Debug)]
pub struct Capture {
    root: Attrs,
    entries: Vec<Entry>,
    pending: Vec<(ChunkId, Vec<u8>)>,
    batch: Batch,
    next_cache: HashMap<Vec<u8>, CachedFile>,
    files: u64,
    changed_files: u64,
    bytes: u64,
    new_bytes: u64,
    stored_bytes: u64,
    skipped_special: u64,
    elapsed: Duration,
}

impl Capture {
    /// Uncompressed bytes of new chunks held in memory, waiting for [`Capture::commit`].
    pub fn pending_bytes(&self) -> u64 {
        self.pending.iter().map(|(_, d)| d.len() as u64).sum()
    }

    /// How long the capture took.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }

    /// The second phase: stores the new chunks (compressed) and the manifest, and replaces the
    /// cache's contents with what this capture saw.
    pub fn commit(mut self, store: &ChunkStore, cache: &mut MetaCache) -> Result<SnapshotReport> {
        let mut new_bytes = self.new_bytes;
        let mut stored_bytes = self.stored_bytes;
        for (id, data) in &self.pending {
            let put = store.stage_known(&mut self.batch, *id, data)?;
            if put.new {
                new_bytes += data.len() as u64;
                stored_bytes += put.stored_bytes;
            }
        }
        // The chunks are durable under their names before the manifest that names them is.
        store.publish(std::mem::take(&mut self.batch))?;
        let manifest = Manifest::new(self.root, self.entries)?;
        let put = manifest.store(store)?;
        stored_bytes += put.stored_bytes;
        cache.files = self.next_cache;
        Ok(SnapshotReport {
            id: put.id,
            files: self.files,
            changed_files: self.changed_files,
            bytes: self.bytes,
            new_bytes,
            stored_bytes,
            skipped_special: self.skipped_special,
            capture_elapsed: self.elapsed,
        })
    }
}

/// What a snapshot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    /// The snapshot's id (the id of its manifest in the store).
    pub id: ChunkId,
    /// Regular files in the snapshot.
    pub files: u64,
    /// Regular files that were read (new, changed, or not vouched for by the cache).
    pub changed_files: u64,
    /// Total size of the regular files.
    pub bytes: u64,
    /// Uncompressed bytes of file chunks that were new to the store.
    pub new_bytes: u64,
    /// Compressed bytes written to the store (new chunks and the manifest).
    pub stored_bytes: u64,
    /// Sockets, FIFOs and device nodes skipped.
    pub skipped_special: u64,
    /// How long [`capture`] took (the time the caller's container stays paused).
    pub capture_elapsed: Duration,
}

/// The first phase of a snapshot of `dir` (see the [module documentation](self)).
pub fn capture(dir: impl AsRef<Path>, cache: &MetaCache, store: &ChunkStore) -> Result<Capture> {
    capture_with(dir, cache, store, &CaptureOptions::default())
}

/// [`capture`] with options.
pub fn capture_with(
    dir: impl AsRef<Path>,
    cache: &MetaCache,
    store: &ChunkStore,
    options: &CaptureOptions,
) -> Result<Capture> {
    let started = Instant::now();
    let dir = dir.as_ref();
    let racy_before = i128::try_from(
        SystemTime::now()
            .checked_sub(RACY_WINDOW)
            .unwrap_or(UNIX_EPOCH)
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    )
    .unwrap_or(0);

    let root_md = fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !root_md.is_dir() {
        return Err(Error::BadPath { path: dir.to_path_buf(), reason: "not a directory" });
    }
    let mut state = State {
        store,
        cache,
        options,
        racy_before,
        known: HashSet::new(),
        pending_ids: HashSet::new(),
        capture: Capture {
            root: attrs_of(&root_md),
            entries: Vec::new(),
            pending: Vec::new(),
            batch: Batch::default(),
            next_cache: HashMap::new(),
            files: 0,
            changed_files: 0,
            bytes: 0,
            new_bytes: 0,
            stored_bytes: 0,
            skipped_special: 0,
            elapsed: Duration::ZERO,
        },
        pending_bytes: 0,
    };

    let walk = walkdir::WalkDir::new(dir).follow_links(false).follow_root_links(true).same_file_system(true);
    for item in walk.into_iter() {
        let item = item.map_err(|e| walk_error(dir, e))?;
        if item.depth() == 0 {
            continue;
        }
        let path = item.path();
        let rel = path
            .strip_prefix(dir)
            .map_err(|_| Error::BadPath {
                path: path.to_path_buf(),
                reason: "outside the snapshot directory",
            })?
            .as_os_str()
            .as_bytes()
            .to_vec();
        let md = fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
        state.entry(path, rel, &md)?;
    }
    let mut capture = state.capture;
    capture.elapsed = started.elapsed();
    Ok(capture)
}

/// Takes a snapshot of `dir` in one call: [`capture`] then [`Capture::commit`].
pub fn snapshot(dir: impl AsRef<Path>, cache: &mut MetaCache, store: &ChunkStore) -> Result<SnapshotReport> {
    capture(dir, cache, store)?.commit(store, cache)
}

struct State<'a> {
    store: &'a ChunkStore,
    cache: &'a MetaCache,
    options: &'a CaptureOptions,
    racy_before: i128,
    /// Chunks seen in the store during this capture.
    known: HashSet<ChunkId>,
    /// Chunks waiting in `capture.pending`.
    pending_ids: HashSet<ChunkId>,
    capture: Capture,
    pending_bytes: usize,
}

impl State<'_> {
    fn entry(&mut self, path: &Path, rel: Vec<u8>, md: &Metadata) -> Result<()> {
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            EntryKind::Dir
        } else if ft.is_symlink() {
            let target = fs::read_link(path).map_err(|e| Error::io(path, e))?;
            EntryKind::Symlink { target: target.into_os_string().into_vec() }
        } else if ft.is_file() {
            let (size, chunks) = self.file(path, &rel, md)?;
            EntryKind::File { size, chunks }
        } else {
            self.capture.skipped_special += 1;
            return Ok(());
        };
        self.capture.entries.push(Entry { path: rel, kind, attrs: attrs_of(md) });
        Ok(())
    }

    /// The chunks of a regular file: from the cache when it vouches for the file and the store
    /// still holds them, else by reading it.
    fn file(&mut self, path: &Path, rel: &[u8], md: &Metadata) -> Result<(u64, Vec<ChunkRef>)> {
        self.capture.files += 1;
        if let Some(cached) = self.cache.get(rel) {
            if cached.matches(md) && cached.chunks.iter().all(|c| self.present(&c.id)) {
                self.capture.bytes += cached.size;
                self.capture.next_cache.insert(rel.to_vec(), cached.clone());
                return Ok((cached.size, cached.chunks.clone()));
            }
        }
        self.capture.changed_files += 1;

        let file = open_nofollow(path)?;
        let before = file.metadata().map_err(|e| Error::io(path, e))?;
        if !before.is_file() {
            return Err(Error::BadPath { path: path.to_path_buf(), reason: "replaced while being read" });
        }
        let (chunks, size) = if before.size() >= PIPELINE_MIN_BYTES {
            self.cut_pipelined(path, &file)?
        } else {
            let mut cut = Cut::default();
            for chunk in StreamCDC::new(&file, CDC_MIN, CDC_AVG, CDC_MAX) {
                let chunk = chunk.map_err(|e| Error::io(path, io::Error::from(e)))?;
                cut.add(self, chunk.data)?;
            }
            (cut.chunks, cut.size)
        };
        self.capture.bytes += size;

        let after = file.metadata().map_err(|e| Error::io(path, e))?;
        let unchanged = after.size() == size
            && mtime_ns(&after) == mtime_ns(&before)
            && ctime_ns(&after) == ctime_ns(&before)
            && after.ino() == before.ino();
        if unchanged && ctime_ns(&after) < self.racy_before {
            self.capture.next_cache.insert(
                rel.to_vec(),
                CachedFile {
                    size,
                    mtime_ns: mtime_ns(&after),
                    ctime_ns: ctime_ns(&after),
                    ino: after.ino(),
                    chunks: chunks.clone(),
                },
            );
        }
        Ok((size, chunks))
    }

    /// Cuts a large file with two threads: this one reads it and finds the chunk boundaries, the
    /// other hashes and keeps each chunk, so the pause lasts about the longer of the two rather
    /// than their sum.
    fn cut_pipelined(&mut self, path: &Path, file: &File) -> Result<(Vec<ChunkRef>, u64)> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(PIPELINE_DEPTH);
        std::thread::scope(|scope| {
            let worker = scope.spawn(|| -> Result<Cut> {
                let mut cut = Cut::default();
                for data in rx {
                    cut.add(self, data)?;
                }
                Ok(cut)
            });
            let mut read = Ok(());
            for chunk in StreamCDC::new(file, CDC_MIN, CDC_AVG, CDC_MAX) {
                match chunk {
                    // A closed channel: the worker failed, and says why below.
                    Ok(chunk) => {
                        if tx.send(chunk.data).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        read = Err(Error::io(path, io::Error::from(e)));
                        break;
                    }
                }
            }
            drop(tx);
            let cut = worker
                .join()
                .unwrap_or_else(|_| Err(Error::io(path, io::Error::other("the hashing thread panicked"))))?;
            read?;
            Ok((cut.chunks, cut.size))
        })
    }

    /// Whether the store holds `id` (remembering the answer for this capture).
    fn present(&mut self, id: &ChunkId) -> bool {
        if self.known.contains(id) {
            return true;
        }
        if self.store.contains(id) {
            self.known.insert(*id);
            return true;
        }
        false
    }

    /// Keeps a chunk the store may not have: in memory, or stored now beyond the memory bound.
    fn keep(&mut self, id: ChunkId, data: Vec<u8>) -> Result<()> {
        if self.pending_ids.contains(&id) || self.present(&id) {
            return Ok(());
        }
        if self.pending_bytes.saturating_add(data.len()) > self.options.max_pending_bytes {
            let put = self.store.stage_known(&mut self.capture.batch, id, &data)?;
            if put.new {
                self.capture.new_bytes += data.len() as u64;
                self.capture.stored_bytes += put.stored_bytes;
            }
            self.known.insert(id);
            return Ok(());
        }
        self.pending_bytes += data.len();
        self.pending_ids.insert(id);
        self.capture.pending.push((id, data));
        Ok(())
    }
}

/// Files at least this large are cut by two threads ([`State::cut_pipelined`]).
const PIPELINE_MIN_BYTES: u64 = 4 * 1024 * 1024;

/// Chunks in flight between the reading thread and the hashing thread.
const PIPELINE_DEPTH: usize = 64;

/// A file's chunks as they are cut.
#[derive(Default)]
struct Cut {
    chunks: Vec<ChunkRef>,
    size: u64,
}

impl Cut {
    /// Hashes the next chunk of the file, records it, and keeps it if the store may lack it.
    fn add(&mut self, state: &mut State<'_>, data: Vec<u8>) -> Result<()> {
        let id = ChunkId::of(&data);
        // A chunk is at most CDC_MAX bytes.
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        self.size += u64::from(len);
        self.chunks.push(ChunkRef { id, len });
        state.keep(id, data)
    }
}

/// Opens a file for reading without following a symbolic link in its last component.
fn open_nofollow(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

fn walk_error(dir: &Path, e: walkdir::Error) -> Error {
    let path = e.path().map(Path::to_path_buf).unwrap_or_else(|| dir.to_path_buf());
    let source = match e.into_io_error() {
        Some(io) => io,
        None => io::Error::other("file system loop"),
    };
    Error::io(path, source)
}

fn attrs_of(md: &Metadata) -> Attrs {
    Attrs {
        mode: md.mode() & MODE_MASK,
        uid: md.uid(),
        gid: md.gid(),
        mtime: Timestamp {
            secs: md.mtime(),
            nanos: u32::try_from(md.mtime_nsec()).unwrap_or(0).min(999_999_999),
        },
    }
}

fn mtime_ns(md: &Metadata) -> i128 {
    i128::from(md.mtime()) * 1_000_000_000 + i128::from(md.mtime_nsec())
}

fn ctime_ns(md: &Metadata) -> i128 {
    i128::from(md.ctime()) * 1_000_000_000 + i128::from(md.ctime_nsec())
}
