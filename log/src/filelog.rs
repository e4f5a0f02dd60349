//! The Raft log and the vote, in append-only segment files of our own (see "Log and vote" in
//! [`crate::store`] for how the store uses it).
//!
//! # Files
//!
//! A directory (`DIR/store/raft-log/`) of segment files named `SEQ.seg`, `SEQ` being 16 hex digits
//! counting up from 1. Only the last segment is written to; when it has grown past
//! [`SEGMENT_BYTES`] a new one is started. A segment starts with a header of [`HEADER_LEN`] bytes:
//! the magic `coyote-raft-log\n`, the format version (`u32`), the segment's sequence number (`u64`),
//! and the CRC32 of those 28 bytes (all little-endian). Records follow, each framed as its payload's
//! length (`u32`), the CRC32 of the length's four bytes and the payload (`u32`), then the payload: a
//! bincode-encoded `Record`:
//!
//! - `Entry`: a log entry. Appending entry `i` ends the log at `i` (anything after it is gone);
//! - `Truncated(i)`: the entries from `i` on are removed;
//! - `Purged(log_id)`: the entries up to `log_id` are removed, and this is the last purged log id;
//! - `Vote`, `Committed`: the last saved vote and commit index.
//!
//! The state is what replaying all records of all segments, in order, gives. A new segment is
//! written under a temporary name (`SEQ.seg.tmp`) with its header and the current vote, commit index
//! and last purged log id, synced, then renamed into place, so the records of older segments that
//! only held state can be dropped with them.
//!
//! # Writes and `fdatasync`
//!
//! Every call writes its records with one positional write at the segment's end; nothing is cached in
//! user space, and no other thread is involved. Making the writes durable is the caller's choice:
//! [`FileLog::sync_handle`] gives the current segment, and `fdatasync` on it makes every record
//! written before the call durable. [`crate::store`] calls it inline for a follower's append, a vote
//! and a truncation, and from its flusher thread for the leader's own appends. Starting a new segment
//! syncs the old one first, so only the last segment can hold unsynced records.
//!
//! If a write fails (a full disk), the segment is cut back to its length before the write and the log
//! refuses every later write: the node must stop, and its next start sees a clean log.
//!
//! # Recovery
//!
//! [`FileLog::open`] reads every segment and checks every header and record CRC, and decodes every
//! record, so damage is reported at start-up. A crash can leave the last segment with a torn tail:
//! records that were being written, and never synced, when the machine stopped. The last segment's
//! tail is cut off (and the cut synced) when its first bad record either runs past the end of the
//! file or is followed by nothing but zeros (a file extended but never written). Anything else (a bad
//! record followed by data, a bad header, a bad record in an earlier segment, which was synced before
//! the next one began) is corruption and an error naming the segment and the offset: it cannot be
//! told apart from a lost acknowledged write, so nothing is dropped silently.
//!
//! # Purging
//!
//! A purge writes its record without syncing (a lost purge only brings back entries the snapshot
//! covers). Whole segments whose entries are all purged are then deleted, oldest first, the last one
//! never: before deleting any, the current segment is synced, so that the `Purged` record that makes
//! the deletion look intended is on disk before the entries disappear.
//!
//! # In memory
//!
//! For the simulator the same code runs on [`MemorySegments`]: segments as byte vectors that outlive
//! the store, with no file and no sync.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use coyote_state_machine::{decode, encode};
use openraft::Vote;
use serde::{Deserialize, Serialize};

use crate::error::StoreError;
use crate::types::{Entry, LogId, NodeId};

/// The first bytes of every segment.
const MAGIC: &[u8; 16] = b"coyote-raft-log\n";
/// The segment format this code writes and reads.
const VERSION: u32 = 1;
/// Bytes of a segment header.
pub const HEADER_LEN: usize = 32;
/// Bytes before each record's payload: its length and its CRC.
pub const FRAME_LEN: usize = 8;
/// A segment grows to about this size before the next one begins.
pub const SEGMENT_BYTES: u64 = 64 << 20;
/// Largest record accepted on reading (a length beyond it is damage, not a record).
const RECORD_MAX: u32 = 1 << 30;

/// One record of a segment, as read.
#[derive(Serialize, Deserialize, Debug)]
enum Record {
    Entry(Entry),
    Vote(Vote<NodeId>),
    Committed(Option<LogId>),
    Purged(LogId),
    Truncated(u64),
}

/// The same records, borrowed for writing (same variants in the same order: the same encoding).
#[derive(Serialize)]
enum RecordRef<'a> {
    Entry(&'a Entry),
    Vote(&'a Vote<NodeId>),
    Committed(&'a Option<LogId>),
    Purged(&'a LogId),
    Truncated(u64),
}

/// Segments in memory, for the simulator: they outlive the stores opened on them, like a directory.
#[derive(Clone, Default)]
pub struct MemorySegments(pub(crate) Arc<Mutex<SegmentMap>>);

/// One byte vector per segment, by sequence number.
pub(crate) type SegmentMap = BTreeMap<u64, Arc<Mutex<Vec<u8>>>>;

impl MemorySegments {
    fn lock(&self) -> std::sync::MutexGuard<'_, SegmentMap> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Where the segments are.
#[derive(Clone)]
pub enum Medium {
    Dir(PathBuf),
    Memory(MemorySegments),
}

/// One segment, to write, read and sync.
#[derive(Clone)]
pub enum Segment {
    File(Arc<File>),
    Memory(Arc<Mutex<Vec<u8>>>),
}

impl Segment {
    fn write_at(&self, offset: u64, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Segment::File(f) => f.write_all_at(bytes, offset),
            Segment::Memory(m) => {
                let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
                m.truncate(offset as usize);
                m.extend_from_slice(bytes);
                Ok(())
            }
        }
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        match self {
            Segment::File(f) => f.read_exact_at(buf, offset),
            Segment::Memory(m) => {
                let m = m.lock().unwrap_or_else(|p| p.into_inner());
                let start = offset as usize;
                let part = m.get(start..start + buf.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?;
                buf.copy_from_slice(part);
                Ok(())
            }
        }
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        match self {
            Segment::File(f) => f.set_len(len),
            Segment::Memory(m) => {
                m.lock().unwrap_or_else(|p| p.into_inner()).truncate(len as usize);
                Ok(())
            }
        }
    }

    /// `fdatasync`: every record written before this call is durable when it returns.
    pub fn sync(&self) -> std::io::Result<()> {
        match self {
            Segment::File(f) => f.sync_data(),
            Segment::Memory(_) => Ok(()),
        }
    }
}

fn file_name(seq: u64) -> String {
    format!("{seq:016x}.seg")
}

pub(crate) fn header(seq: u64) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..16].copy_from_slice(MAGIC);
    h[16..20].copy_from_slice(&VERSION.to_le_bytes());
    h[20..28].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32fast::hash(&h[..28]);
    h[28..].copy_from_slice(&crc.to_le_bytes());
    h
}

pub(crate) fn frame_crc(len: [u8; 4], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&len);
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one framed record to `buf`; returns the payload's offset in `buf` and its length.
fn frame(buf: &mut Vec<u8>, record: &RecordRef<'_>) -> (usize, u32) {
    let payload = encode(record);
    let len = (payload.len() as u32).to_le_bytes();
    buf.extend_from_slice(&len);
    buf.extend_from_slice(&frame_crc(len, &payload).to_le_bytes());
    let at = buf.len();
    buf.extend_from_slice(&payload);
    (at, payload.len() as u32)
}

fn io_error(action: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    move |e| StoreError::Io { action, source: sled::Error::Io(e) }
}

/// Where an entry's payload is.
#[derive(Clone, Copy, Debug)]
struct Loc {
    seq: u64,
    offset: u64,
    len: u32,
    log_id: LogId,
}

struct SegmentState {
    segment: Segment,
    /// Bytes written so far (the next record goes here).
    len: u64,
    /// The highest entry index ever written to it.
    max_index: Option<u64>,
}

/// The log: its segments, and in memory where each entry is plus the vote, commit index and purge point.
pub struct FileLog {
    medium: Medium,
    /// Sync the directory and a segment where the format needs it ([`crate::store::Options::durable`]).
    durable: bool,
    segment_bytes: u64,
    segments: BTreeMap<u64, SegmentState>,
    entries: BTreeMap<u64, Loc>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId>,
    /// The commit index changed since it was last written: written with the next record.
    committed_dirty: bool,
    purged: Option<LogId>,
    /// Set when a write failed: no more writes.
    failed: Option<String>,
}

/// What [`FileLog::append`] did.
pub struct Appended {
    pub last: u64,
}

impl FileLog {
    /// Creates an empty log (its first segment) in an absent or empty directory, or in memory.
    pub fn create(medium: &Medium, durable: bool) -> Result<(), StoreError> {
        if let Medium::Dir(dir) = medium {
            std::fs::create_dir_all(dir).map_err(io_error("create the Raft log directory"))?;
        }
        write_new_segment(medium, durable, 1, &[])?;
        Ok(())
    }

    /// Opens the log, checking every record and cutting a torn tail off the last segment.
    pub fn open(medium: Medium, durable: bool) -> Result<FileLog, StoreError> {
        let mut found: Vec<(u64, Segment, Vec<u8>, String)> = Vec::new();
        match &medium {
            Medium::Dir(dir) => {
                let listing = std::fs::read_dir(dir).map_err(|e| {
                    corrupt_at(
                        dir.display().to_string(),
                        format!("the Raft log directory cannot be read: {e}"),
                    )
                })?;
                for item in listing {
                    let item = item.map_err(io_error("list the Raft log directory"))?;
                    let name = item.file_name().to_string_lossy().into_owned();
                    if name.ends_with(".seg.tmp") {
                        // A segment whose creation a crash interrupted: it was never used.
                        std::fs::remove_file(item.path())
                            .map_err(io_error("remove an unfinished segment"))?;
                        continue;
                    }
                    let seq = name
                        .strip_suffix(".seg")
                        .filter(|s| s.len() == 16)
                        .and_then(|s| u64::from_str_radix(s, 16).ok())
                        .ok_or_else(|| {
                            corrupt_at(
                                dir.display().to_string(),
                                format!("the Raft log directory holds a file that is not a segment: {name}"),
                            )
                        })?;
                    let path = item.path();
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)
                        .map_err(io_error("open a Raft log segment"))?;
                    let bytes = std::fs::read(&path).map_err(io_error("read a Raft log segment"))?;
                    found.push((seq, Segment::File(Arc::new(file)), bytes, path.display().to_string()));
                }
            }
            Medium::Memory(m) => {
                for (&seq, seg) in m.lock().iter() {
                    let bytes = seg.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    found.push((
                        seq,
                        Segment::Memory(seg.clone()),
                        bytes,
                        format!("<memory>/{}", file_name(seq)),
                    ));
                }
            }
        }
        found.sort_by_key(|f| f.0);
        if found.is_empty() {
            return Err(corrupt_at("the Raft log", "it has no segment (the directory was emptied?)"));
        }
        let mut log = FileLog {
            medium,
            durable,
            segment_bytes: SEGMENT_BYTES,
            segments: BTreeMap::new(),
            entries: BTreeMap::new(),
            vote: None,
            committed: None,
            committed_dirty: false,
            purged: None,
            failed: None,
        };
        let count = found.len();
        for (n, (seq, segment, bytes, name)) in found.into_iter().enumerate() {
            let last = n + 1 == count;
            let len = log.replay(seq, &segment, &bytes, &name, last)?;
            if len < bytes.len() as u64 {
                tracing::warn!(
                    segment = %name,
                    kept = len,
                    dropped = bytes.len() as u64 - len,
                    "cut a torn tail off the Raft log (records a crash interrupted before they were synced)"
                );
                segment.set_len(len).map_err(io_error("cut a torn tail off the Raft log"))?;
                if durable {
                    segment.sync().map_err(io_error("sync the Raft log"))?;
                }
            }
        }
        Ok(log)
    }

    /// Replays one segment; returns the length of its good part.
    fn replay(
        &mut self,
        seq: u64,
        segment: &Segment,
        bytes: &[u8],
        name: &str,
        last: bool,
    ) -> Result<u64, StoreError> {
        let bad = |offset: usize, reason: String| corrupt_at(format!("{name} at offset {offset}"), reason);
        if bytes.len() < HEADER_LEN || bytes[..HEADER_LEN] != header(seq) {
            let reason = if bytes.len() >= 16 && bytes[..16] != MAGIC[..] {
                "it is not a coyote Raft log segment".to_string()
            } else if bytes.len() >= 20 && bytes[16..20] != VERSION.to_le_bytes() {
                format!(
                    "its format version is {}, this coyote reads {VERSION}",
                    u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes"))
                )
            } else {
                "its header is damaged".to_string()
            };
            return Err(bad(0, reason));
        }
        let mut max_index = None;
        let mut at = HEADER_LEN;
        while at < bytes.len() {
            let rest = &bytes[at..];
            let torn = |why: &str| -> Result<(), StoreError> {
                if last {
                    Ok(())
                } else {
                    Err(bad(at, format!("{why} in a segment that is not the last one")))
                }
            };
            if rest.len() < FRAME_LEN {
                torn("a cut record")?;
                break;
            }
            let len_bytes: [u8; 4] = rest[..4].try_into().expect("4 bytes");
            let len = u32::from_le_bytes(len_bytes);
            let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
            let end = FRAME_LEN as u64 + len as u64;
            let whole = len <= RECORD_MAX && end <= rest.len() as u64;
            if !whole || frame_crc(len_bytes, &rest[FRAME_LEN..end as usize]) != crc {
                // Torn if it runs past the end of the file, or nothing but zeros follows it.
                let runs_past = len <= RECORD_MAX && end > rest.len() as u64;
                let zeros = rest.iter().all(|&b| b == 0);
                if last && (runs_past || zeros) {
                    break;
                }
                let reason = if whole {
                    "a record's checksum does not match (damaged data, not a torn tail)".to_string()
                } else if runs_past {
                    "a record is cut short in a segment that is not the last one (damaged data)".to_string()
                } else {
                    format!("a record claims {len} bytes, more than a record can hold (damaged data)")
                };
                return Err(bad(at, reason));
            }
            let payload = &rest[FRAME_LEN..end as usize];
            let record: Record = decode(payload)
                .map_err(|e| bad(at, format!("a record passes its checksum but cannot be decoded: {e}")))?;
            let offset = (at + FRAME_LEN) as u64;
            match record {
                Record::Entry(entry) => {
                    let index = entry.log_id.index;
                    self.entries.split_off(&index);
                    if let Some((&prev, _)) = self.entries.last_key_value() {
                        if prev + 1 != index {
                            return Err(StoreError::Inconsistent {
                                what: format!("log entry {index} ({name} at offset {at})"),
                                reason: format!("it follows entry {prev}: the log has a gap"),
                            });
                        }
                    }
                    self.entries.insert(index, Loc { seq, offset, len, log_id: entry.log_id });
                    max_index = max_index.max(Some(index));
                }
                Record::Vote(vote) => self.vote = Some(vote),
                Record::Committed(committed) => self.committed = committed,
                Record::Purged(log_id) => {
                    // A purge up to the largest index leaves nothing (and `index + 1` would overflow).
                    self.entries = match log_id.index.checked_add(1) {
                        Some(next) => self.entries.split_off(&next),
                        None => BTreeMap::new(),
                    };
                    self.purged = self.purged.max(Some(log_id));
                }
                Record::Truncated(index) => {
                    self.entries.split_off(&index);
                }
            }
            at += end as usize;
        }
        self.segments.insert(seq, SegmentState { segment: segment.clone(), len: at as u64, max_index });
        Ok(at as u64)
    }

    pub fn vote(&self) -> Option<Vote<NodeId>> {
        self.vote
    }

    pub fn committed(&self) -> Option<LogId> {
        self.committed
    }

    pub fn purged(&self) -> Option<LogId> {
        self.purged
    }

    /// The last entry's log id, or the last purged one if the log is empty.
    pub fn last_log_id(&self) -> Option<LogId> {
        self.entries.last_key_value().map(|(_, l)| l.log_id).or(self.purged)
    }

    /// The index of the last entry (0 for none).
    pub fn last_index(&self) -> u64 {
        self.entries.last_key_value().map(|(&i, _)| i).unwrap_or(0)
    }

    /// The index of the last entry stored, if any (index 0 is a real entry: the first membership).
    #[cfg(feature = "planted-bugs")]
    pub fn last_stored(&self) -> Option<u64> {
        self.entries.last_key_value().map(|(&i, _)| i)
    }

    /// The segment that the last writes went to: sync it to make them durable.
    pub fn sync_handle(&self) -> Segment {
        self.current().segment.clone()
    }

    fn current(&self) -> &SegmentState {
        self.segments.last_key_value().expect("a log has at least one segment").1
    }

    /// Sets the segment size limit (tests).
    pub fn set_segment_bytes(&mut self, bytes: u64) {
        self.segment_bytes = bytes;
    }

    /// How many segments there are.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Writes `entries` (not synced). Returns `None` if there were none.
    pub fn append<'a>(
        &mut self,
        entries: impl IntoIterator<Item = &'a Entry>,
    ) -> Result<Option<Appended>, StoreError> {
        let mut buf = Vec::new();
        let mut placed = Vec::new();
        for entry in entries {
            let (at, len) = frame(&mut buf, &RecordRef::Entry(entry));
            placed.push((at, len, entry.log_id));
        }
        let Some(&(_, _, last)) = placed.last() else {
            return Ok(None);
        };
        self.rotate_if_full()?;
        let committed_prefix = self.take_committed_record();
        let base = self.write(&[&committed_prefix, &buf], "append log entries")?;
        let seq = *self.segments.last_key_value().expect("a segment").0;
        let base = base + committed_prefix.len() as u64;
        for (at, len, log_id) in placed {
            self.entries.split_off(&log_id.index);
            self.entries.insert(log_id.index, Loc { seq, offset: base + at as u64, len, log_id });
        }
        let current = self.segments.last_entry().expect("a segment");
        let current = current.into_mut();
        current.max_index = current.max_index.max(Some(last.index));
        Ok(Some(Appended { last: last.index }))
    }

    /// Records the vote (not synced).
    pub fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StoreError> {
        let mut buf = self.take_committed_record();
        frame(&mut buf, &RecordRef::Vote(vote));
        self.write(&[&buf], "save the vote")?;
        self.vote = Some(*vote);
        Ok(())
    }

    /// Remembers the commit index; it is written with the next record, unsynced.
    pub fn save_committed(&mut self, committed: Option<LogId>) {
        if self.committed != committed {
            self.committed = committed;
            self.committed_dirty = true;
        }
    }

    /// Writes the commit index if it changed since it was last written (not synced).
    pub fn flush_committed(&mut self) -> Result<(), StoreError> {
        let buf = self.take_committed_record();
        if !buf.is_empty() {
            self.write(&[&buf], "save the commit index")?;
        }
        Ok(())
    }

    /// Removes the entries from `index` on (not synced).
    pub fn truncate(&mut self, index: u64) -> Result<(), StoreError> {
        let mut buf = self.take_committed_record();
        frame(&mut buf, &RecordRef::Truncated(index));
        self.write(&[&buf], "truncate the log")?;
        self.entries.split_off(&index);
        Ok(())
    }

    /// Removes the entries up to `log_id` (not synced), then deletes the segments that hold nothing
    /// else (after syncing the purge record).
    pub fn purge(&mut self, log_id: LogId) -> Result<(), StoreError> {
        let mut buf = self.take_committed_record();
        frame(&mut buf, &RecordRef::Purged(&log_id));
        self.write(&[&buf], "save the purge point")?;
        self.entries = self.entries.split_off(&(log_id.index + 1));
        self.purged = self.purged.max(Some(log_id));
        let current = *self.segments.last_key_value().expect("a segment").0;
        let dead: Vec<u64> = self
            .segments
            .iter()
            .take_while(|(&seq, s)| seq != current && s.max_index.is_none_or(|m| m <= log_id.index))
            .map(|(&seq, _)| seq)
            .collect();
        if dead.is_empty() {
            return Ok(());
        }
        if self.durable {
            self.sync_handle().sync().map_err(io_error("sync the Raft log"))?;
        }
        for seq in dead {
            if let Medium::Dir(dir) = &self.medium {
                std::fs::remove_file(dir.join(file_name(seq)))
                    .map_err(io_error("remove a purged segment"))?;
            } else if let Medium::Memory(m) = &self.medium {
                m.lock().remove(&seq);
            }
            self.segments.remove(&seq);
        }
        Ok(())
    }

    /// Reads the entries in `range` that the log holds.
    pub fn read(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        for (&index, loc) in self.entries.range(range) {
            let segment = &self.segments.get(&loc.seq).expect("an entry's segment is kept").segment;
            let mut buf = vec![0u8; FRAME_LEN + loc.len as usize];
            segment.read_at(loc.offset - FRAME_LEN as u64, &mut buf).map_err(io_error("read log entries"))?;
            let len_bytes: [u8; 4] = buf[..4].try_into().expect("4 bytes");
            let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
            let what = || format!("log entry {index} ({} at offset {})", file_name(loc.seq), loc.offset);
            if u32::from_le_bytes(len_bytes) != loc.len || frame_crc(len_bytes, &buf[FRAME_LEN..]) != crc {
                return Err(StoreError::Corrupt {
                    what: what(),
                    reason: "its checksum no longer matches (damaged on disk)".into(),
                });
            }
            match decode::<Record>(&buf[FRAME_LEN..]) {
                Ok(Record::Entry(entry)) if entry.log_id == loc.log_id => out.push(entry),
                Ok(other) => {
                    return Err(StoreError::Inconsistent {
                        what: what(),
                        reason: format!("another record is stored where it was written: {other:?}"),
                    })
                }
                Err(e) => return Err(StoreError::Corrupt { what: what(), reason: e.to_string() }),
            }
        }
        Ok(out)
    }

    fn take_committed_record(&mut self) -> Vec<u8> {
        let mut buf = Vec::new();
        if std::mem::take(&mut self.committed_dirty) {
            let committed = self.committed;
            frame(&mut buf, &RecordRef::Committed(&committed));
        }
        buf
    }

    /// Writes `parts` at the end of the current segment in one write; returns where they begin.
    fn write(&mut self, parts: &[&[u8]], action: &'static str) -> Result<u64, StoreError> {
        if let Some(why) = &self.failed {
            return Err(StoreError::Task { action, reason: format!("an earlier write failed: {why}") });
        }
        let bytes: Vec<u8> = if parts.len() == 1 { parts[0].to_vec() } else { parts.concat() };
        let current = self.segments.last_entry().expect("a segment").into_mut();
        let base = current.len;
        match current.segment.write_at(base, &bytes) {
            Ok(()) => {
                current.len += bytes.len() as u64;
                Ok(base)
            }
            Err(e) => {
                // Cut what part of it was written, so that no half record stays in the middle.
                let _ = current.segment.set_len(base);
                self.failed = Some(e.to_string());
                Err(io_error(action)(e))
            }
        }
    }

    /// Starts a new segment if the current one is full: syncs the current one, then creates the next
    /// with the current state in it.
    fn rotate_if_full(&mut self) -> Result<(), StoreError> {
        let (&seq, current) = self.segments.last_key_value().expect("a segment");
        if current.len < self.segment_bytes {
            return Ok(());
        }
        if self.durable {
            current.segment.sync().map_err(io_error("sync the Raft log"))?;
        }
        let mut state = Vec::new();
        if let Some(vote) = &self.vote {
            frame(&mut state, &RecordRef::Vote(vote));
        }
        if let Some(purged) = &self.purged {
            frame(&mut state, &RecordRef::Purged(purged));
        }
        let committed = self.committed;
        frame(&mut state, &RecordRef::Committed(&committed));
        self.committed_dirty = false;
        let (segment, len) = write_new_segment(&self.medium, self.durable, seq + 1, &state)?;
        self.segments.insert(seq + 1, SegmentState { segment, len, max_index: None });
        Ok(())
    }
}

impl Drop for FileLog {
    /// A store closed in order keeps its last commit index (unsynced, like every commit index).
    fn drop(&mut self) {
        if self.failed.is_none() {
            let _ = self.flush_committed();
        }
    }
}

/// Creates segment `seq` holding `records`: under a temporary name, synced, renamed into place.
fn write_new_segment(
    medium: &Medium,
    durable: bool,
    seq: u64,
    records: &[u8],
) -> Result<(Segment, u64), StoreError> {
    let bytes = [&header(seq)[..], records].concat();
    match medium {
        Medium::Dir(dir) => {
            let path = dir.join(file_name(seq));
            let tmp = dir.join(format!("{}.tmp", file_name(seq)));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(io_error("create a Raft log segment"))?;
            file.write_all_at(&bytes, 0).map_err(io_error("write a Raft log segment"))?;
            if durable {
                file.sync_all().map_err(io_error("sync a new Raft log segment"))?;
            }
            std::fs::rename(&tmp, &path).map_err(io_error("name a new Raft log segment"))?;
            if durable {
                sync_dir(dir)?;
            }
            Ok((Segment::File(Arc::new(file)), bytes.len() as u64))
        }
        Medium::Memory(m) => {
            let seg = Arc::new(Mutex::new(bytes.clone()));
            m.lock().insert(seq, seg.clone());
            Ok((Segment::Memory(seg), bytes.len() as u64))
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_error("sync the Raft log directory"))
}

fn corrupt_at(what: impl Into<String>, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt { what: what.into(), reason: reason.into() }
}

#[cfg(test)]
mod tests;
