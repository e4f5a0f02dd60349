//! The archive of applied events: the `events` tree and the records not written to it yet (see
//! "State machine and archive" in the store's docs).

use std::fmt::Debug;

use coyote_state_machine::{encode, Envelope, Outcome};
use serde::{Deserialize, Serialize};

use super::*;

/// An applied event as archived: the envelope and what applying it gave.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub envelope: Envelope,
    pub outcome: Outcome,
}

/// Decodes a record of the event archive and checks that it carries the index it is stored under.
pub(crate) fn read_event_record(key: &[u8], value: &[u8]) -> Result<EventRecord, StoreError> {
    let index = key_index(key, EVENTS_TREE)?;
    let record: EventRecord = decode_from_disk(value, || format!("archived event {index}"))?;
    if record.envelope.index != index {
        return Err(inconsistent(
            format!("archived event {index}"),
            format!("it is stored at {index} but carries index {}", record.envelope.index),
        ));
    }
    Ok(record)
}

pub(super) fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

pub(super) fn key_index(key: &[u8], tree: &str) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| {
        inconsistent(format!("a key of the {tree} tree"), format!("it is {} bytes, not 8", key.len()))
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// Applied events are written to the `events` tree in batches of this many (and whenever a snapshot
/// is built). Each sled batch costs far more than the records in it.
pub const ARCHIVE_BATCH: usize = 512;

impl Shared {
    /// Archived events with indexes in `[from, upto]`, at most `limit` of them: from the `events` tree,
    /// then from `unarchived` (the events after the tree's, see [`Machine::unarchived`]).
    pub(super) fn read_events(
        &self,
        from: u64,
        upto: u64,
        limit: usize,
        unarchived: &[EventRecord],
    ) -> Result<Vec<EventRecord>, StoreError> {
        let mut records = Vec::new();
        if from > upto {
            return Ok(records);
        }
        // The tree may hold records past the first unarchived one, written before a restart; the
        // unarchived records are the applied ones.
        let tree_upto = match unarchived.first() {
            Some(first) => upto.min(first.envelope.index.saturating_sub(1)),
            None => upto,
        };
        let from_tree = (from <= tree_upto)
            .then(|| self.events.range(index_key(from)..=index_key(tree_upto)).take(limit));
        for item in from_tree.into_iter().flatten() {
            let (key, value) = item.map_err(io("read the event archive"))?;
            records.push(read_event_record(&key, &value)?);
        }
        let rest = unarchived
            .iter()
            .filter(|r| r.envelope.index >= from && r.envelope.index <= upto)
            .take(limit - records.len());
        records.extend(rest.cloned());
        Ok(records)
    }

    /// Writes the unarchived events to the `events` tree, in one batch (without a flush: like the
    /// state, they are rebuilt by re-applying their entries after a restart).
    pub(super) fn archive_unarchived(&self, machine: &mut Machine) -> Result<(), StoreError> {
        if machine.unarchived.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for record in &machine.unarchived {
            batch.insert(&index_key(record.envelope.index), encode(record));
        }
        self.events.apply_batch(batch).map_err(io("archive applied events"))?;
        machine.unarchived.clear();
        Ok(())
    }

    /// Replaces the whole archive with `archive`, in one batch.
    pub(super) fn replace_archive(&self, archive: &[EventRecord]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for key in self.events.iter().keys() {
            batch.remove(key.map_err(io("read the event archive"))?);
        }
        for record in archive {
            batch.insert(&index_key(record.envelope.index), encode(record));
        }
        self.events.apply_batch(batch).map_err(io("replace the event archive"))
    }

    /// Makes the archive up to the snapshot equal to the snapshot's, if a crash left it otherwise.
    /// Returns whether it had to.
    pub(super) fn repair_archive(&self, body: &SnapshotBody) -> Result<bool, StoreError> {
        let upto = body.state.last_applied;
        let mut stored = self.events.range(..=index_key(upto));
        let mut same = true;
        for record in &body.archive {
            match stored.next() {
                Some(Ok((key, value)))
                    if *key == index_key(record.envelope.index) && *value == *encode(record) => {}
                Some(Err(e)) => return Err(io("read the event archive")(e)),
                _ => {
                    same = false;
                    break;
                }
            }
        }
        if same && stored.next().is_none() {
            return Ok(false);
        }
        let mut batch = sled::Batch::default();
        for key in self.events.range(..=index_key(upto)).keys() {
            batch.remove(key.map_err(io("read the event archive"))?);
        }
        for record in &body.archive {
            batch.insert(&index_key(record.envelope.index), encode(record));
        }
        self.events.apply_batch(batch).map_err(io("repair the event archive"))?;
        self.flush_now("flush the repaired event archive")?;
        Ok(true)
    }
}
