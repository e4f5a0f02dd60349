//! coyote-data: the content-addressed snapshot store that lets a service's data directory follow
//! its authority between servers.
//!
//! - [`chunks`]: the [`ChunkStore`], a directory of zstd-compressed chunks named by the blake3 hash
//!   of their content.
//! - [`manifest`]: the [`Manifest`], the description of one snapshot of a directory tree; a
//!   manifest is stored in the same store as content-defined parts under an index, and a
//!   snapshot's id is the index's id.
//! - [`snapshot`](mod@snapshot): taking a snapshot in two phases, [`capture`] (while the service's
//!   container is paused) and [`Capture::commit`] (after it resumes), with a [`MetaCache`] so
//!   unchanged files are not read again.
//! - [`restore`](mod@restore): writing a snapshot back as a directory, atomically.
//! - [`export`]: a snapshot as a tar stream.
//! - [`gc`](mod@gc): removing chunks no kept snapshot needs.
//!
//! Everything read from disk or received from another node is checked (hashes, sizes, paths);
//! nothing in this crate panics on such input.

pub mod chunks;
pub mod error;
pub mod export;
pub mod gc;
pub mod manifest;
pub mod restore;
pub mod snapshot;

pub use chunks::{
    Batch, ChunkId, ChunkStore, Put, VerifyReport, CDC_AVG, CDC_MAX, CDC_MIN, DEFAULT_LEVEL, MAX_CHUNK_BYTES,
    MAX_OBJECT_BYTES,
};
pub use error::{Error, Result};
pub use export::export_tar;
pub use gc::{gc, GcReport};
pub use manifest::{Attrs, ChunkRef, Entry, EntryKind, Manifest, Timestamp};
pub use restore::{missing, remove_restored, restore, restore_with_base, sync_restored, Base, RestoreReport};
pub use snapshot::{
    capture, capture_with, snapshot, CachedFile, Capture, CaptureOptions, MetaCache, SnapshotReport,
};
