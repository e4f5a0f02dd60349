//! The chunk store: a directory of content-addressed, zstd-compressed chunks.
//!
//! A chunk is named by the blake3 hash of its *uncompressed* bytes ([`ChunkId`]) and stored
//! compressed at `ROOT/chunks/ab/abcd…` (the first two hex digits of its id as a fan-out
//! directory). A write goes to a fresh file in `ROOT/tmp/`, is made durable, renamed into place,
//! and the rename is made durable; a chunk already present is never rewritten. So a chunk file that
//! exists under its name is complete, and a crash leaves at most stale files in `ROOT/tmp/`, which
//! [`ChunkStore::open`] removes.
//!
//! Many chunks are written as one [`Batch`]: each goes to its temporary file as it comes, and
//! [`ChunkStore::publish`] fsyncs them all at once from a few threads (so the file system commits
//! them together), renames them, and fsyncs each fan-out directory once. A single
//! [`ChunkStore::put`] is a batch of one. Only the store's own files are synced: other writers'
//! data on the same file system is not flushed with them.
//!
//! Reading decompresses with a bound on the output ([`MAX_CHUNK_BYTES`] for file data,
//! [`MAX_OBJECT_BYTES`] for manifests) and re-hashes, so neither a damaged disk nor a hostile peer
//! can make the store hand out wrong bytes or exhaust memory. Chunks received from another node
//! ([`ChunkStore::put_compressed`]) are checked the same way before anything is written.
//!
//! One `ChunkStore` value may be shared between threads; two processes must not open the same
//! root at once (opening removes the other's temporary files).

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The smallest chunk content-defined chunking cuts (except a file's last chunk).
pub const CDC_MIN: usize = 4 * 1024;
/// The average chunk size content-defined chunking aims for: small enough that a database's
/// scattered page writes cost little more than the pages, large enough that a manifest stays a
/// small fraction of the data.
pub const CDC_AVG: usize = 16 * 1024;
/// The largest chunk content-defined chunking cuts.
pub const CDC_MAX: usize = 64 * 1024;

/// The largest file-data chunk: what [`ChunkStore::get`] decompresses at most, and what a
/// manifest may name. Larger than [`CDC_MAX`], so chunks cut with larger settings stay readable.
pub const MAX_CHUNK_BYTES: usize = 256 * 1024;

/// The largest object the store holds at all (a manifest is stored as one object): the bound for
/// [`ChunkStore::put`], [`ChunkStore::put_compressed`] and [`ChunkStore::verify`].
pub const MAX_OBJECT_BYTES: usize = 256 * 1024 * 1024;

/// The zstd level chunks are compressed with unless [`ChunkStore::with_level`] says otherwise.
pub const DEFAULT_LEVEL: i32 = 3;

/// The name of a chunk: the blake3 hash of its uncompressed bytes.
///
/// Shown and parsed as 64 lowercase hex digits; serialized as a string in human-readable formats
/// and as 32 bytes otherwise.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The id of `data`.
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// The 32 bytes of the hash.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The 64 hex digits.
    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({self})")
    }
}

impl FromStr for ChunkId {
    type Err = Error;

    fn from_str(s: &str) -> Result<ChunkId> {
        let bad = |reason| Error::InvalidChunkId { input: s.chars().take(80).collect(), reason };
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(bad("not 64 hex digits"));
        }
        let mut out = [0u8; 32];
        for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            let (hi, lo) = match pair {
                [hi, lo] => (hex_digit(*hi), hex_digit(*lo)),
                _ => (None, None),
            };
            match (hi, lo) {
                (Some(hi), Some(lo)) => *o = hi << 4 | lo,
                _ => return Err(bad("not a hex digit")),
            }
        }
        Ok(ChunkId(out))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            self.0.serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ChunkId, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            s.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 32]>::deserialize(d).map(ChunkId)
        }
    }
}

/// What [`ChunkStore::put`] or [`ChunkStore::put_compressed`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Put {
    /// The chunk's id.
    pub id: ChunkId,
    /// Compressed bytes written by this call (0 when the chunk was already there).
    pub stored_bytes: u64,
    /// Whether this call wrote the chunk (false: it was already in the store).
    pub new: bool,
}

/// What [`ChunkStore::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// How many chunks were read and re-hashed.
    pub checked: u64,
    /// The chunks that do not decompress, are too large, cannot be read, or hash to something
    /// other than their name.
    pub corrupt: Vec<ChunkId>,
}

/// A directory of chunks. See the [module documentation](self).
#[derive(Debug)]
pub struct ChunkStore {
    root: PathBuf,
    chunks: PathBuf,
    tmp: PathBuf,
    reserve: u64,
    level: i32,
}

/// Distinguishes temporary files written at the same time by the threads of one process.
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl ChunkStore {
    /// Opens (creating if needed) the store at `root`, and removes temporary files a crash left.
    ///
    /// The store starts with no disk reserve and [`DEFAULT_LEVEL`] compression.
    pub fn open(root: impl AsRef<Path>) -> Result<ChunkStore> {
        let root = root.as_ref().to_path_buf();
        let chunks = root.join("chunks");
        let tmp = root.join("tmp");
        for dir in [&root, &chunks, &tmp] {
            create_dir_synced(dir)?;
        }
        let entries = fs::read_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&tmp, e))?;
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Ok(ChunkStore { root, chunks, tmp, reserve: 0, level: DEFAULT_LEVEL })
    }

    /// The same store, refusing writes that would leave fewer than `bytes` free on its file system.
    pub fn with_reserve(mut self, bytes: u64) -> ChunkStore {
        self.reserve = bytes;
        self
    }

    /// Changes the disk reserve (see [`ChunkStore::with_reserve`]).
    pub fn set_reserve(&mut self, bytes: u64) {
        self.reserve = bytes;
    }

    /// The disk reserve in bytes.
    pub fn reserve(&self) -> u64 {
        self.reserve
    }

    /// The same store, compressing new chunks at zstd `level`.
    pub fn with_level(mut self, level: i32) -> ChunkStore {
        self.level = level;
        self
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where chunk `id` lives (whether or not it is there).
    pub fn chunk_path(&self, id: &ChunkId) -> PathBuf {
        let hex = id.to_hex();
        self.chunks.join(&hex[..2]).join(hex)
    }

    /// Whether the store holds chunk `id` (a file exists under its name; its content is checked
    /// on reading, not here).
    pub fn contains(&self, id: &ChunkId) -> bool {
        fs::symlink_metadata(self.chunk_path(id)).is_ok()
    }

    /// Stores `data` as a chunk under its hash, compressed. A chunk already present is not
    /// rewritten (and not compressed again).
    pub fn put(&self, data: &[u8]) -> Result<Put> {
        self.put_known(ChunkId::of(data), data)
    }

    /// [`ChunkStore::put`] for bytes whose id the caller has just computed.
    pub(crate) fn put_known(&self, id: ChunkId, data: &[u8]) -> Result<Put> {
        let mut batch = Batch::default();
        let put = self.stage_known(&mut batch, id, data)?;
        self.publish(batch)?;
        Ok(put)
    }

    /// [`ChunkStore::put`] into `batch`: the chunk is written to a temporary file and becomes part
    /// of the store when the batch is [published](ChunkStore::publish).
    pub fn stage(&self, batch: &mut Batch, data: &[u8]) -> Result<Put> {
        self.stage_known(batch, ChunkId::of(data), data)
    }

    /// [`ChunkStore::stage`] for bytes whose id the caller has just computed.
    pub(crate) fn stage_known(&self, batch: &mut Batch, id: ChunkId, data: &[u8]) -> Result<Put> {
        if data.len() > MAX_OBJECT_BYTES {
            return Err(Error::TooLarge { len: data.len(), max: MAX_OBJECT_BYTES });
        }
        if batch.ids.contains(&id) || self.contains(&id) {
            return Ok(Put { id, stored_bytes: 0, new: false });
        }
        let compressed =
            zstd::bulk::compress(data, self.level).map_err(|e| Error::io(self.chunk_path(&id), e))?;
        self.write_tmp(batch, id, &compressed)
    }

    /// Stores a chunk received from another node in its compressed form, as
    /// [`ChunkStore::get_compressed`] gave it there.
    ///
    /// The bytes are decompressed (at most [`MAX_OBJECT_BYTES`], streaming, so memory stays
    /// small) and hashed; if they do not hash to `id` the call fails with
    /// [`Error::HashMismatch`] (or [`Error::Corrupt`] when they do not decompress) and stores
    /// nothing.
    pub fn put_compressed(&self, id: &ChunkId, compressed: &[u8]) -> Result<Put> {
        let mut batch = Batch::default();
        let put = self.stage_compressed(&mut batch, id, compressed)?;
        self.publish(batch)?;
        Ok(put)
    }

    /// [`ChunkStore::put_compressed`] into `batch` (see [`ChunkStore::stage`]); the bytes are
    /// checked before anything is written.
    pub fn stage_compressed(&self, batch: &mut Batch, id: &ChunkId, compressed: &[u8]) -> Result<Put> {
        let actual = hash_compressed(compressed, MAX_OBJECT_BYTES).map_err(|reason| Error::Corrupt {
            id: *id,
            reason: format!("received bytes are not a valid chunk: {reason}"),
        })?;
        if actual != *id {
            return Err(Error::HashMismatch { expected: *id, actual });
        }
        if batch.ids.contains(id) || self.contains(id) {
            return Ok(Put { id: *id, stored_bytes: 0, new: false });
        }
        self.write_tmp(batch, *id, compressed)
    }

    /// Makes every chunk of `batch` part of the store, durably: their temporary files are fsynced,
    /// each is renamed to its name, and the fan-out directories the renames touched are fsynced.
    /// On a failure the chunks not yet renamed are removed; those renamed stay (each is whole).
    pub fn publish(&self, mut batch: Batch) -> Result<()> {
        if batch.staged.is_empty() {
            return Ok(());
        }
        let tmps: Vec<PathBuf> = batch.staged.iter().map(|s| s.tmp.clone()).collect();
        sync_all(&tmps, false)?;
        let mut fanouts = BTreeSet::new();
        let mut staged = std::mem::take(&mut batch.staged).into_iter();
        while let Some(next) = staged.next() {
            let dest = self.chunk_path(&next.id);
            let renamed = match dest.parent() {
                // Each fan-out directory is made (if need be) once per batch.
                Some(fanout) if !fanouts.contains(fanout) => {
                    fanouts.insert(fanout.to_path_buf());
                    create_dir_synced(fanout)
                }
                _ => Ok(()),
            }
            .and_then(|()| fs::rename(&next.tmp, &dest).map_err(|e| Error::io(&dest, e)));
            if let Err(e) = renamed {
                for left in std::iter::once(next).chain(staged) {
                    let _ = fs::remove_file(&left.tmp);
                }
                return Err(e);
            }
        }
        sync_all(&fanouts.into_iter().collect::<Vec<_>>(), true)
    }

    /// Reads chunk `id` of file data: decompressed (at most [`MAX_CHUNK_BYTES`]) and checked
    /// against its hash.
    pub fn get(&self, id: &ChunkId) -> Result<Vec<u8>> {
        self.get_with_limit(id, MAX_CHUNK_BYTES)
    }

    /// Reads chunk `id` decompressing at most `limit` bytes (manifests are read with
    /// [`MAX_OBJECT_BYTES`]); a chunk that decompresses to more is [`Error::Corrupt`].
    pub fn get_with_limit(&self, id: &ChunkId, limit: usize) -> Result<Vec<u8>> {
        let compressed = self.get_compressed(id)?;
        let data = decompress_bounded(&compressed, limit).map_err(|reason| Error::corrupt(*id, reason))?;
        let actual = ChunkId::of(&data);
        if actual != *id {
            return Err(Error::corrupt(*id, format!("content hashes to {actual}")));
        }
        Ok(data)
    }

    /// The chunk's stored (compressed) bytes, unchecked, for shipping to another node (which
    /// checks them with [`ChunkStore::put_compressed`]).
    pub fn get_compressed(&self, id: &ChunkId) -> Result<Vec<u8>> {
        let path = self.chunk_path(id);
        match fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::MissingChunk { id: *id }),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Removes chunk `id`; returns whether it was there.
    pub fn remove(&self, id: &ChunkId) -> Result<bool> {
        let path = self.chunk_path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Every chunk in the store, in id order. Files whose names are not chunk ids in the right
    /// fan-out directory are ignored.
    pub fn list(&self) -> Result<Vec<ChunkId>> {
        let mut ids = BTreeSet::new();
        let fanouts = fs::read_dir(&self.chunks).map_err(|e| Error::io(&self.chunks, e))?;
        for fanout in fanouts {
            let fanout = fanout.map_err(|e| Error::io(&self.chunks, e))?;
            let dir = fanout.path();
            let Some(prefix) = fanout.file_name().to_str().map(str::to_owned) else { continue };
            if prefix.len() != 2 || !fanout.file_type().map_err(|e| Error::io(&dir, e))?.is_dir() {
                continue;
            }
            for entry in fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                let entry = entry.map_err(|e| Error::io(&dir, e))?;
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
                if let Ok(id) = name.parse::<ChunkId>() {
                    if name.starts_with(&prefix) && name == id.to_hex() {
                        ids.insert(id);
                    }
                }
            }
        }
        Ok(ids.into_iter().collect())
    }

    /// Reads and re-hashes every chunk (streaming, at most [`MAX_OBJECT_BYTES`] each).
    pub fn verify(&self) -> Result<VerifyReport> {
        let mut report = VerifyReport::default();
        for id in self.list()? {
            let compressed = match self.get_compressed(&id) {
                Ok(c) => c,
                Err(Error::MissingChunk { .. }) => continue, // removed meanwhile
                Err(_) => {
                    report.checked += 1;
                    report.corrupt.push(id);
                    continue;
                }
            };
            report.checked += 1;
            if hash_compressed(&compressed, MAX_OBJECT_BYTES).ok() != Some(id) {
                report.corrupt.push(id);
            }
        }
        Ok(report)
    }

    /// Free bytes on the store's file system, for unprivileged writers (statvfs `f_bavail`).
    pub fn free_bytes(&self) -> Result<u64> {
        let st = rustix::fs::statvfs(&self.root).map_err(|e| crate::error::rio(&self.root, e))?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Writes an already compressed chunk to a temporary file of `batch`, after the reserve check.
    /// On any failure the temporary file is removed.
    fn write_tmp(&self, batch: &mut Batch, id: ChunkId, compressed: &[u8]) -> Result<Put> {
        let need = compressed.len() as u64;
        if self.reserve > 0 {
            let free = self.free_bytes()?;
            if free.saturating_sub(need) < self.reserve {
                return Err(Error::DiskReserve { free, reserve: self.reserve });
            }
        }
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = self.tmp.join(format!("{id}.{}.{n}", std::process::id()));
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&tmp)
                .map_err(|e| Error::io(&tmp, e))?;
            file.write_all(compressed).map_err(|e| Error::io(&tmp, e))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        batch.ids.insert(id);
        batch.staged.push(Staged { id, tmp });
        Ok(Put { id, stored_bytes: need, new: true })
    }
}

/// Chunks written to temporary files and not yet part of the store: see [`ChunkStore::stage`] and
/// [`ChunkStore::publish`]. Dropping a batch without publishing it removes its temporary files.
#[derive(Debug, Default)]
pub struct Batch {
    staged: Vec<Staged>,
    ids: HashSet<ChunkId>,
}

impl Batch {
    /// How many chunks the batch holds.
    pub fn len(&self) -> usize {
        self.staged.len()
    }

    /// Whether the batch holds no chunk.
    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }
}

#[derive(Debug)]
struct Staged {
    id: ChunkId,
    tmp: PathBuf,
}

impl Drop for Batch {
    fn drop(&mut self) {
        for staged in &self.staged {
            let _ = fs::remove_file(&staged.tmp);
        }
    }
}

/// Creates `dir` if it does not exist, and then fsyncs its parent so the new entry is durable.
fn create_dir_synced(dir: &Path) -> Result<()> {
    match fs::create_dir(dir) {
        Ok(()) => match dir.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => sync_dir(parent),
            _ => Ok(()),
        },
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io(dir, e)),
    }
}

/// The most threads [`sync_all`] fsyncs from.
const SYNC_THREADS: usize = 8;

/// Fsyncs every file (or directory, when `dirs`) of `paths`, from up to [`SYNC_THREADS`] threads:
/// fsyncs that wait at the same time share the file system's journal commits.
fn sync_all(paths: &[PathBuf], dirs: bool) -> Result<()> {
    let sync = |path: &PathBuf| -> Result<()> {
        if dirs {
            return sync_dir(path);
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        file.sync_all().map_err(|e| Error::io(path, e))
    };
    let threads = paths.len().div_ceil(4).min(SYNC_THREADS);
    if threads <= 1 {
        return paths.iter().try_for_each(sync);
    }
    let next = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    match paths.get(i) {
                        Some(path) => sync(path)?,
                        None => return Ok(()),
                    }
                })
            })
            .collect();
        workers.into_iter().try_for_each(|w| {
            w.join().unwrap_or_else(|_| Err(Error::io("fsync", io::Error::other("an fsync thread panicked"))))
        })
    })
}

/// Fsyncs a directory, making the renames and creations in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| Error::io(dir, e))?;
    d.sync_all().map_err(|e| Error::io(dir, e))
}

/// Decompresses `compressed`, refusing output larger than `limit`. Memory grows with the output
/// actually produced, never beyond `limit` plus one read buffer.
fn decompress_bounded(compressed: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    let decoder = zstd::stream::read::Decoder::with_buffer(compressed).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    decoder.take(limit as u64 + 1).read_to_end(&mut out).map_err(|e| format!("does not decompress: {e}"))?;
    if out.len() > limit {
        return Err(format!("decompresses to more than {limit} bytes"));
    }
    Ok(out)
}

/// Decompresses `compressed` into the hasher without keeping the output, refusing more than
/// `limit` bytes. Returns the id of the decompressed bytes.
fn hash_compressed(compressed: &[u8], limit: usize) -> Result<ChunkId, String> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(compressed).map_err(|e| e.to_string())?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("does not decompress: {e}")),
        };
        total = total.saturating_add(n);
        if total > limit {
            return Err(format!("decompresses to more than {limit} bytes"));
        }
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(ChunkId(*hasher.finalize().as_bytes()))
}
