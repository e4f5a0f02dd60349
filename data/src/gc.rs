//! Garbage collection: removing chunks that no kept snapshot needs.
//!
//! [`gc`] keeps the manifests of the snapshots it is told to keep (their indexes and parts), every
//! chunk they use, and every
//! chunk written less than `grace` ago (a transfer or a snapshot may be storing chunks whose
//! manifest does not exist yet); it removes every other chunk. A kept snapshot whose manifest is
//! missing or damaged stops the collection before anything is removed.
//!
//! The caller must not run a collection while a snapshot of the same store is between
//! [`capture`](crate::capture) and [`Capture::commit`](crate::Capture::commit): a capture counts on
//! the chunks it found in the store staying there, and those may be older than the grace period.

use std::collections::HashSet;
use std::fs;
use std::time::{Duration, SystemTime};

use crate::chunks::{ChunkId, ChunkStore};
use crate::error::{Error, Result};
use crate::manifest::Manifest;

/// What a collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Chunks kept (reachable from a kept snapshot, or within the grace period).
    pub kept: u64,
    /// Chunks removed.
    pub removed: u64,
    /// Stored (compressed) bytes of the removed chunks.
    pub removed_bytes: u64,
}

/// Removes from `store` every chunk not reachable from the snapshots `keep` and older than
/// `grace`. See the [module documentation](self).
pub fn gc(store: &ChunkStore, keep: &[ChunkId], grace: Duration) -> Result<GcReport> {
    let mut reachable: HashSet<ChunkId> = HashSet::new();
    for id in keep {
        let manifest = Manifest::load(store, id)?;
        reachable.insert(*id);
        reachable.extend(Manifest::parts(store, id)?);
        reachable.extend(manifest.chunks());
    }
    let now = SystemTime::now();
    let mut report = GcReport::default();
    for id in store.list()? {
        if reachable.contains(&id) {
            report.kept += 1;
            continue;
        }
        let path = store.chunk_path(&id);
        let md = match fs::symlink_metadata(&path) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(&path, e)),
        };
        let age = md.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or(Duration::ZERO);
        if age < grace {
            report.kept += 1;
            continue;
        }
        if store.remove(&id)? {
            report.removed += 1;
            report.removed_bytes += md.len();
        }
    }
    Ok(report)
}
