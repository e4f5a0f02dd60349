//! Opening sled safely, the store's format marker, creating a new store, and the migration from
//! the format before.

use std::path::Path;

use openraft::Vote;

use crate::filelog::{FileLog, Medium};
use crate::types::{Entry, LogId, NodeId};

use super::*;

/// Key of the format marker, in sled's default tree.
pub(super) const FORMAT_KEY: &[u8] = b"coyote/store-format";
/// The format this code reads and writes: sled for the state machine's side, the Raft log and vote
/// in [`crate::filelog`] segments in the [`RAFT_LOG_DIR`] subdirectory.
pub(super) const FORMAT: &[u8] = b"coyote-store/3";
/// The format before: the Raft log in sled's `log` tree, the vote, commit index and purge point in
/// `meta`. [`open`] migrates it.
pub(super) const FORMAT_V2: &[u8] = b"coyote-store/2";
/// Where a migration from [`FORMAT_V2`] builds the Raft log before renaming it into place.
pub(super) const MIGRATING_DIR: &str = "raft-log.migrating";
pub(super) const V2_LOG_TREE: &str = "log";
pub(super) const V2_VOTE_KEY: &[u8] = b"raft/vote";
pub(super) const V2_COMMITTED_KEY: &[u8] = b"raft/committed";
pub(super) const V2_PURGED_KEY: &[u8] = b"raft/last-purged";

/// Files and directories sled 0.34 keeps in a database directory, and our Raft log's directory.
pub(super) fn is_sled_file(name: &str) -> bool {
    matches!(name, "conf" | "db" | "blobs" | RAFT_LOG_DIR | MIGRATING_DIR) || name.starts_with("snap.")
}

/// Opens the store's sled database, or creates it. Errors and panics of sled become a reason.
///
/// sled "recovers" a directory whose `db` or `conf` it cannot read by starting an empty database over
/// it. That would make a damaged store look like a new node that remembers no vote and no log, so
/// sled is only ever pointed at a directory that is absent, empty, or holds both `conf` and `db`; and a
/// new store is created elsewhere and renamed into place with its format marker already written (see
/// [`create_db`]), so an existing directory without the marker is never ours.
pub(super) fn open_db(path: &Path) -> Result<sled::Db, String> {
    let existing = match std::fs::read_dir(path) {
        Ok(entries) => {
            let mut names = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| format!("cannot list the directory: {e}"))?;
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
            names.sort();
            names
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("cannot list the directory: {e}")),
    };
    if existing.is_empty() {
        create_db(path)?;
    } else if existing.iter().any(|n| !is_sled_file(n))
        || !["conf", "db"].iter().all(|f| existing.iter().any(|n| n == f))
    {
        return Err(format!(
            "the directory is not empty and does not hold a coyote store (it contains: {})",
            existing.join(", ")
        ));
    }
    let db = sled_open(path)?;
    check_format(&db)?;
    Ok(db)
}

/// Runs `sled::open`, turning a panic into an error.
///
/// sled locks its `db` file, and releases the lock only when its background threads let go of the
/// file, a little after the last handle is dropped. So a store closed and reopened within one process
/// (a restarted node in the simulation, a test) can find it still locked for a moment: that error alone
/// is retried, for up to [`LOCK_WAIT`]. Another process holding the store gets the error after that.
pub(super) fn sled_open(path: &Path) -> Result<sled::Db, String> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled_open_once(path) {
            Err(e) if e.contains("could not acquire lock") && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

/// How long [`sled_open`] waits for a lock held by a store closed a moment ago.
pub(super) const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub(super) fn sled_open_once(path: &Path) -> Result<sled::Db, String> {
    match std::panic::catch_unwind(|| sled::Config::new().path(path).open()) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(format!("sled panicked while opening it: {message}"))
        }
    }
}

/// Creates a new store at `path` (absent or an empty directory): in a sibling directory first, with the
/// format marker written and flushed, then renamed into place. A crash leaves either no store or a
/// complete empty one, never a directory without its marker.
pub(super) fn create_db(path: &Path) -> Result<(), String> {
    let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
        return Err("the path has no parent directory to create the store in".into());
    };
    let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    let staging = parent.join(format!(".{}.creating", name.to_string_lossy()));
    if staging.exists() {
        // Left by a crash during an earlier creation: nothing in it was ever used.
        std::fs::remove_dir_all(&staging).map_err(|e| format!("cannot remove {}: {e}", staging.display()))?;
    }
    {
        let db = sled_open(&staging)?;
        db.insert(FORMAT_KEY, FORMAT).map_err(|e| format!("cannot write the format marker: {e}"))?;
        db.flush().map_err(|e| format!("cannot flush the new store: {e}"))?;
    }
    FileLog::create(&Medium::Dir(staging.join(RAFT_LOG_DIR)), true)
        .map_err(|e| format!("cannot create the Raft log: {e}"))?;
    if path.exists() {
        std::fs::remove_dir(path).map_err(|e| format!("cannot replace the empty directory: {e}"))?;
    }
    std::fs::rename(&staging, path).map_err(|e| format!("cannot move the new store into place: {e}"))?;
    // The rename itself must reach the disk.
    std::fs::File::open(parent)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", parent.display()))?;
    Ok(())
}

/// Checks the format marker: the current format, or (`Ok(false)`) the one before, to migrate.
pub(super) fn check_format(db: &sled::Db) -> Result<bool, String> {
    match db.get(FORMAT_KEY).map_err(|e| format!("cannot read the format marker: {e}"))? {
        Some(found) if *found == *FORMAT => Ok(true),
        Some(found) if *found == *FORMAT_V2 => Ok(false),
        Some(found) => Err(format!(
            "it holds store format {:?}, this coyote reads {:?} (and migrates {:?})",
            String::from_utf8_lossy(&found),
            String::from_utf8_lossy(FORMAT),
            String::from_utf8_lossy(FORMAT_V2)
        )),
        None => {
            Err("it is a sled database without a coyote format marker: another program's, or damaged".into())
        }
    }
}

/// Moves the Raft log, vote, commit index and purge point of a [`FORMAT_V2`] store out of sled into a
/// new file log, then marks the store as the current format. The new log is built beside the store's
/// files and renamed into place, and the marker changes only after that, so a crash at any point
/// leaves either the old store (and the migration runs again) or the new one.
pub(super) fn migrate_v2(path: &Path, db: &sled::Db) -> Result<(), StoreError> {
    let what = |e: StoreError| StoreError::Open {
        path: path.to_path_buf(),
        reason: format!("migrating the store from {}: {e}", String::from_utf8_lossy(FORMAT_V2)),
    };
    let meta = db.open_tree(META_TREE).map_err(io("open the store's trees")).map_err(what)?;
    let get = |key: &[u8]| -> Result<Option<Vec<u8>>, StoreError> {
        let value = meta.get(key).map_err(io("read the store metadata"))?;
        Ok(value.map(|v| v.to_vec()))
    };
    let vote: Option<Vote<NodeId>> = get(V2_VOTE_KEY)
        .and_then(|v| v.map(|b| decode_from_disk(&b, || "the saved vote".into())).transpose())
        .map_err(what)?;
    let committed: Option<Option<LogId>> = get(V2_COMMITTED_KEY)
        .and_then(|v| v.map(|b| decode_from_disk(&b, || "the saved commit index".into())).transpose())
        .map_err(what)?;
    let purged: Option<LogId> = get(V2_PURGED_KEY)
        .and_then(|v| v.map(|b| decode_from_disk(&b, || "the last purged log id".into())).transpose())
        .map_err(what)?;
    let log = db.open_tree(V2_LOG_TREE).map_err(io("open the store's trees")).map_err(what)?;
    let staging = path.join(MIGRATING_DIR);
    let target = path.join(RAFT_LOG_DIR);
    let build = || -> Result<(), StoreError> {
        for dir in [&staging, &target] {
            if dir.exists() {
                // Left by an interrupted migration: the old store is still the authority.
                std::fs::remove_dir_all(dir)
                    .map_err(|e| io("remove an unfinished migration")(sled::Error::Io(e)))?;
            }
        }
        let medium = Medium::Dir(staging.clone());
        FileLog::create(&medium, true)?;
        let mut wal = FileLog::open(medium, true)?;
        if let Some(purged) = purged {
            wal.purge(purged)?;
        }
        let mut entries = Vec::new();
        for item in log.iter() {
            let (key, value) = item.map_err(io("read log entries"))?;
            let index = key_index(&key, V2_LOG_TREE)?;
            let entry: Entry = decode_from_disk(&value, || format!("log entry {index}"))?;
            if entry.log_id.index != index {
                return Err(inconsistent(
                    format!("log entry {index}"),
                    format!("it is stored at {index} but carries index {}", entry.log_id.index),
                ));
            }
            if purged.is_none_or(|p| index > p.index) {
                entries.push(entry);
            }
        }
        wal.append(&entries)?;
        wal.save_committed(committed.flatten());
        match vote {
            Some(vote) => wal.save_vote(&vote)?,
            None => wal.flush_committed()?,
        }
        wal.sync_handle().sync().map_err(|e| io("sync the Raft log")(sled::Error::Io(e)))?;
        drop(wal);
        std::fs::rename(&staging, &target)
            .map_err(|e| io("move the Raft log into place")(sled::Error::Io(e)))?;
        std::fs::File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(|e| io("sync the store directory")(sled::Error::Io(e)))?;
        db.insert(FORMAT_KEY, FORMAT).map_err(io("write the format marker"))?;
        sync(db, None, "flush the format marker")?;
        // The old records are dead from here on.
        db.drop_tree(V2_LOG_TREE).map_err(io("drop the old log tree"))?;
        for key in [V2_VOTE_KEY, V2_COMMITTED_KEY, V2_PURGED_KEY] {
            meta.remove(key).map_err(io("remove old metadata"))?;
        }
        sync(db, None, "flush the migrated store")?;
        tracing::info!(store = %path.display(), entries = entries.len(), "moved the Raft log out of sled into its own files");
        Ok(())
    };
    build().map_err(what)
}
