//! The file log on real files: recovery of a torn tail, damage in the middle, truncation, purging
//! and segment rotation across reopening.

use std::path::Path;

use openraft::{CommittedLeaderId, EntryPayload, Vote};
use tempfile::TempDir;

use super::*;

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64) -> Entry {
    Entry { log_id: log_id(term, index), payload: EntryPayload::Blank }
}

fn entries(term: u64, range: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    range.map(|i| entry(term, i)).collect()
}

fn medium(dir: &Path) -> Medium {
    Medium::Dir(dir.join("raft-log"))
}

fn new_log(dir: &Path) -> FileLog {
    FileLog::create(&medium(dir), true).unwrap();
    FileLog::open(medium(dir), true).unwrap()
}

fn reopen(dir: &Path) -> FileLog {
    FileLog::open(medium(dir), true).unwrap_or_else(|e| panic!("reopening failed: {e}"))
}

fn indexes(log: &FileLog) -> Vec<u64> {
    log.read(..).unwrap().iter().map(|e| e.log_id.index).collect()
}

fn only_segment(dir: &Path) -> PathBuf {
    let mut segs: Vec<_> =
        std::fs::read_dir(dir.join("raft-log")).unwrap().map(|e| e.unwrap().path()).collect();
    segs.sort();
    segs.pop().unwrap()
}

#[test]
fn entries_vote_and_commit_index_survive_reopening() {
    let dir = TempDir::new().unwrap();
    let mut log = new_log(dir.path());
    log.append(&entries(1, 1..=5)).unwrap();
    log.save_vote(&Vote::new_committed(1, 1)).unwrap();
    log.save_committed(Some(log_id(1, 4)));
    log.append(&entries(1, 6..=6)).unwrap();
    drop(log);
    let log = reopen(dir.path());
    assert_eq!(indexes(&log), [1, 2, 3, 4, 5, 6]);
    assert_eq!(log.vote(), Some(Vote::new_committed(1, 1)));
    assert_eq!(log.committed(), Some(log_id(1, 4)));
    assert_eq!(log.last_log_id(), Some(log_id(1, 6)));
    assert_eq!(log.read(2..4).unwrap(), entries(1, 2..=3));
}

#[test]
fn a_torn_tail_is_cut_off_and_the_log_goes_on() {
    for tear in ["cut", "zeros", "cut-frame"] {
        let dir = TempDir::new().unwrap();
        let mut log = new_log(dir.path());
        log.append(&entries(1, 1..=3)).unwrap();
        log.append(&entries(1, 4..=4)).unwrap();
        drop(log);
        let path = only_segment(dir.path());
        let len = std::fs::metadata(&path).unwrap().len();
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        match tear {
            // The last record was being written: only part of it reached the disk.
            "cut" => file.set_len(len - 3).unwrap(),
            // The file was extended, its data never written.
            "zeros" => file.set_len(len + 4096).unwrap(),
            // Only a few bytes of a next record's frame.
            _ => file.write_all_at(&[7, 0, 0], len).unwrap(),
        }
        drop(file);
        let mut log = reopen(dir.path());
        let expected: &[u64] = if tear == "cut" { &[1, 2, 3] } else { &[1, 2, 3, 4] };
        assert_eq!(indexes(&log), expected, "{tear}");
        log.append(&entries(1, 4..=5)).unwrap();
        drop(log);
        assert_eq!(indexes(&reopen(dir.path())), [1, 2, 3, 4, 5], "{tear}");
    }
}

#[test]
fn a_checksum_mismatch_in_the_middle_is_an_error() {
    let dir = TempDir::new().unwrap();
    let mut log = new_log(dir.path());
    log.append(&entries(1, 1..=1)).unwrap();
    let first_end = log.current().len;
    log.append(&entries(1, 2..=4)).unwrap();
    drop(log);
    let path = only_segment(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // Flip a bit in the payload of the first record: later records follow it.
    bytes[first_end as usize - 2] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let error = FileLog::open(medium(dir.path()), true).map(drop).expect_err("damage in the middle");
    let message = error.to_string();
    assert!(message.contains("checksum does not match"), "{message}");
    assert!(message.contains(&format!("offset {HEADER_LEN}")), "{message}");
    // Nothing was cut: the file is as it was.
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn a_damaged_header_or_a_stray_file_is_an_error() {
    let dir = TempDir::new().unwrap();
    drop(new_log(dir.path()));
    let path = only_segment(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[3] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let message = FileLog::open(medium(dir.path()), true).map(drop).expect_err("bad magic").to_string();
    assert!(message.contains("not a coyote Raft log segment"), "{message}");

    let dir = TempDir::new().unwrap();
    drop(new_log(dir.path()));
    std::fs::write(dir.path().join("raft-log/notes.txt"), "hello").unwrap();
    let message = FileLog::open(medium(dir.path()), true).map(drop).expect_err("stray file").to_string();
    assert!(message.contains("not a segment: notes.txt"), "{message}");

    let dir = TempDir::new().unwrap();
    drop(new_log(dir.path()));
    std::fs::remove_file(only_segment(dir.path())).unwrap();
    let message = FileLog::open(medium(dir.path()), true).map(drop).expect_err("no segment").to_string();
    assert!(message.contains("no segment"), "{message}");
}

#[test]
fn truncate_and_purge_hold_across_reopening() {
    let dir = TempDir::new().unwrap();
    let mut log = new_log(dir.path());
    log.append(&entries(1, 1..=10)).unwrap();
    log.truncate(8).unwrap();
    drop(log);
    let mut log = reopen(dir.path());
    assert_eq!(indexes(&log), [1, 2, 3, 4, 5, 6, 7]);
    // A new term overwrites from 6 on.
    log.append(&entries(2, 6..=9)).unwrap();
    log.purge(log_id(1, 3)).unwrap();
    drop(log);
    let mut log = reopen(dir.path());
    assert_eq!(indexes(&log), [4, 5, 6, 7, 8, 9]);
    assert_eq!(log.read(6..=6).unwrap(), vec![entry(2, 6)]);
    assert_eq!(log.purged(), Some(log_id(1, 3)));
    // Purging everything leaves the purge point as the last log id.
    log.purge(log_id(2, 9)).unwrap();
    drop(log);
    let log = reopen(dir.path());
    assert_eq!(indexes(&log), Vec::<u64>::new());
    assert_eq!(log.last_log_id(), Some(log_id(2, 9)));
}

#[test]
fn segments_rotate_and_purged_ones_are_deleted() {
    let dir = TempDir::new().unwrap();
    let mut log = new_log(dir.path());
    log.set_segment_bytes(200);
    log.save_vote(&Vote::new_committed(3, 2)).unwrap();
    for i in 1..=40 {
        log.append(&entries(3, i..=i)).unwrap();
        log.save_committed(Some(log_id(3, i)));
    }
    let before = log.segment_count();
    assert!(before > 5, "{before} segments");
    drop(log);
    let mut log = reopen(dir.path());
    log.set_segment_bytes(200);
    assert_eq!(indexes(&log), (1..=40).collect::<Vec<_>>());
    log.purge(log_id(3, 30)).unwrap();
    let after = log.segment_count();
    assert!(after < before, "{after} segments after purging, {before} before");
    drop(log);
    let files = std::fs::read_dir(dir.path().join("raft-log")).unwrap().count();
    assert_eq!(files, after);
    let log = reopen(dir.path());
    assert_eq!(indexes(&log), (31..=40).collect::<Vec<_>>());
    // The vote and the purge point outlive the segments they were first written to.
    assert_eq!(log.vote(), Some(Vote::new_committed(3, 2)));
    assert_eq!(log.purged(), Some(log_id(3, 30)));
    assert!(log.committed().is_some_and(|c| c.index >= 39));
}

#[test]
fn damage_in_an_earlier_segment_is_an_error_even_at_its_end() {
    let dir = TempDir::new().unwrap();
    let mut log = new_log(dir.path());
    log.set_segment_bytes(200);
    for i in 1..=40 {
        log.append(&entries(1, i..=i)).unwrap();
    }
    assert!(log.segment_count() > 2);
    drop(log);
    let mut segs: Vec<_> =
        std::fs::read_dir(dir.path().join("raft-log")).unwrap().map(|e| e.unwrap().path()).collect();
    segs.sort();
    let first = &segs[0];
    let len = std::fs::metadata(first).unwrap().len();
    OpenOptions::new().write(true).open(first).unwrap().set_len(len - 2).unwrap();
    let message =
        FileLog::open(medium(dir.path()), true).map(drop).expect_err("cut early segment").to_string();
    assert!(message.contains("not the last one"), "{message}");
}

#[test]
fn an_unfinished_new_segment_is_removed() {
    let dir = TempDir::new().unwrap();
    let mut log = new_log(dir.path());
    log.append(&entries(1, 1..=2)).unwrap();
    drop(log);
    std::fs::write(dir.path().join("raft-log").join(format!("{}.tmp", file_name(2))), b"coyote-raft")
        .unwrap();
    let log = reopen(dir.path());
    assert_eq!(indexes(&log), [1, 2]);
    assert_eq!(std::fs::read_dir(dir.path().join("raft-log")).unwrap().count(), 1);
}

#[test]
fn in_memory_segments_outlive_the_log() {
    let segments = MemorySegments::default();
    let medium = Medium::Memory(segments.clone());
    FileLog::create(&medium, false).unwrap();
    let mut log = FileLog::open(medium.clone(), false).unwrap();
    log.append(&entries(1, 1..=3)).unwrap();
    log.truncate(3).unwrap();
    drop(log);
    let log = FileLog::open(medium, false).unwrap();
    assert_eq!(indexes(&log), [1, 2]);
}

/// A `Purged` record at the largest index: replaying it overflowed `index + 1` (a panic in a debug
/// build), reached by the `file_log` fuzz target. It purges every entry.
#[test]
fn a_purge_at_the_largest_index_purges_everything() {
    let segments = MemorySegments::default();
    let medium = Medium::Memory(segments.clone());
    FileLog::create(&medium, false).unwrap();
    let mut log = FileLog::open(medium.clone(), false).unwrap();
    log.append(&entries(1, 1..=3)).unwrap();
    let mut record = Vec::new();
    frame(&mut record, &RecordRef::Purged(&log_id(1, u64::MAX)));
    log.write(&[&record], "write a purge record").unwrap();
    drop(log);
    let log = FileLog::open(medium, false).unwrap();
    assert_eq!(indexes(&log), [0u64; 0]);
    assert_eq!(log.purged(), Some(log_id(1, u64::MAX)));
}
