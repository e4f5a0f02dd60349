//! Entry points for the fuzz targets of `coyote-fuzz` (`fuzz/`): the decoders of this crate that read
//! what comes from outside the process and are otherwise private. Not an API: nothing else calls them.

use std::sync::{Arc, Mutex};

use coyote_state_machine::decode;

use crate::filelog::{FileLog, Medium, MemorySegments};
use crate::store::{EventRecord, SnapshotBody, StoreError};
use crate::types::{Entry, LogId, Node, NodeId};

/// Snapshot metadata, as openraft defines it for our types.
pub type Meta = openraft::SnapshotMeta<NodeId, Node>;

/// Opens a Raft log over the given segments (sequence number, bytes), as [`FileLog::open`] does at
/// start-up, then reads every entry it holds back. Returns how many entries it read.
pub fn open_file_log(segments: Vec<(u64, Vec<u8>)>) -> Result<usize, StoreError> {
    let memory = MemorySegments::default();
    {
        let mut map = memory.0.lock().unwrap_or_else(|p| p.into_inner());
        for (seq, bytes) in segments {
            map.insert(seq, Arc::new(Mutex::new(bytes)));
        }
    }
    let log = FileLog::open(Medium::Memory(memory), false)?;
    let _ = (log.vote(), log.committed(), log.purged(), log.last_log_id(), log.last_index());
    Ok(log.read(..)?.len())
}

/// The header that starts segment `seq`.
pub fn segment_header(seq: u64) -> Vec<u8> {
    crate::filelog::header(seq).to_vec()
}

/// `payload` framed as a record of a segment (length, CRC, payload).
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_le_bytes();
    let mut out = Vec::with_capacity(crate::filelog::FRAME_LEN + payload.len());
    out.extend_from_slice(&len);
    out.extend_from_slice(&crate::filelog::frame_crc(len, payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The segments of a small real log: entries appended, a vote, a commit index, a truncation and a
/// purge, written by [`FileLog`] itself over two segments.
pub fn sample_segments(entries: &[Entry]) -> Vec<(u64, Vec<u8>)> {
    let memory = MemorySegments::default();
    let medium = Medium::Memory(memory.clone());
    FileLog::create(&medium, false).expect("a log in memory");
    let mut log = FileLog::open(medium, false).expect("a new log opens");
    log.save_vote(&openraft::Vote::new(1, 1)).expect("written in memory");
    log.append(entries).expect("written in memory");
    if let Some(first) = entries.first() {
        log.save_committed(Some(first.log_id));
        log.set_segment_bytes(0);
        log.append(&entries[..1]).expect("written in memory");
        log.truncate(first.log_id.index + 1).expect("written in memory");
        log.purge(first.log_id).expect("written in memory");
    }
    drop(log);
    let map = memory.0.lock().unwrap_or_else(|p| p.into_inner());
    map.iter().map(|(&seq, bytes)| (seq, bytes.lock().unwrap_or_else(|p| p.into_inner()).clone())).collect()
}

/// Decodes snapshot data, as a node does with a received or saved snapshot, and checks it against
/// `meta` (or against its own last log id and membership when `meta` is `None`).
pub fn snapshot(meta: Option<&Meta>, data: &[u8]) -> Result<(), StoreError> {
    let body = SnapshotBody::decode(data, "the fuzzed snapshot")?;
    let own;
    let meta = match meta {
        Some(meta) => meta,
        None => {
            own = Meta {
                last_log_id: body.last_applied,
                last_membership: body.last_membership.clone(),
                snapshot_id: "fuzz".into(),
            };
            &own
        }
    };
    body.check(meta, "the fuzzed snapshot")
}

/// Encodes a snapshot body as the store writes it (for seed inputs).
pub fn encode_snapshot(
    last_applied: Option<LogId>,
    last_membership: openraft::StoredMembership<NodeId, Node>,
    state: coyote_state_machine::State,
    archive: Vec<EventRecord>,
) -> Vec<u8> {
    SnapshotBody { last_applied, last_membership, state, archive, accounts: Default::default() }.encode()
}

/// The kinds of record the store reads from sled, by the tag [`store_record`] takes.
pub const STORE_RECORDS: [&str; 6] =
    ["archived event", "snapshot metadata", "vote", "commit index", "last purged log id", "log entry"];

/// Decodes one record read from sled, as the store does: `kind` indexes [`STORE_RECORDS`] (modulo its
/// length). `key` is the record's key for the archive (the event index it is stored under).
pub fn store_record(kind: u8, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
    match kind as usize % STORE_RECORDS.len() {
        0 => crate::store::read_event_record(key, value).map(drop),
        1 => crate::store::decode_from_disk::<Meta>(value, || "snapshot metadata".into()).map(drop),
        2 => crate::store::decode_from_disk::<openraft::Vote<NodeId>>(value, || "the vote".into()).map(drop),
        3 => crate::store::decode_from_disk::<Option<LogId>>(value, || "the commit index".into()).map(drop),
        4 => crate::store::decode_from_disk::<LogId>(value, || "the last purged log id".into()).map(drop),
        _ => crate::store::decode_from_disk::<Entry>(value, || "a log entry".into()).map(drop),
    }
}

/// Decodes a value with the project's bincode configuration (what the gRPC payloads go through).
pub fn decode_message<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    decode(bytes).map_err(|e| e.to_string())
}
