//! The crate's one error type.
//!
//! Every variant names what it is about (a path or a chunk id) and why. Input from disk or from
//! another node that does not hold up is an error of its own kind ([`Error::Corrupt`],
//! [`Error::HashMismatch`], [`Error::InvalidManifest`]), never a panic.

use std::io;
use std::path::{Path, PathBuf};

use crate::chunks::ChunkId;

/// What can go wrong in the snapshot store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file or directory.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The file system ran out of space (ENOSPC or EDQUOT) while writing `path`. Nothing partial
    /// was left behind.
    #[error("no space left on the file system while writing {}", path.display())]
    DiskFull {
        /// The file being written when the space ran out.
        path: PathBuf,
    },

    /// Writing would leave less free space than the store's configured reserve.
    #[error("refused to write: {free} bytes free, and the store keeps a reserve of {reserve} bytes")]
    DiskReserve {
        /// Free bytes on the store's file system at the time of the check.
        free: u64,
        /// The reserve the store keeps free.
        reserve: u64,
    },

    /// Bytes received for chunk `expected` hash to `actual`; nothing was stored.
    #[error("chunk {expected}: the bytes received hash to {actual}; refused")]
    HashMismatch {
        /// The id the bytes were sent under.
        expected: ChunkId,
        /// The blake3 hash of the bytes after decompression.
        actual: ChunkId,
    },

    /// A stored chunk cannot be read back as what its name says.
    #[error("chunk {id} is corrupt: {reason}")]
    Corrupt {
        /// The chunk.
        id: ChunkId,
        /// Why: does not decompress, too large, hashes to something else, wrong length.
        reason: String,
    },

    /// A chunk a manifest needs is not in the store.
    #[error("chunk {id} is not in the store")]
    MissingChunk {
        /// The chunk.
        id: ChunkId,
    },

    /// A restore needs chunks that the store does not hold.
    #[error("the store lacks {count} chunks this snapshot needs (first: {first})")]
    MissingChunks {
        /// How many distinct chunks are missing.
        count: usize,
        /// The first missing chunk (by id order).
        first: ChunkId,
    },

    /// A manifest (the description of a snapshot) is malformed or unsafe.
    #[error("invalid manifest: {reason}")]
    InvalidManifest {
        /// What is wrong with it, naming the entry where there is one.
        reason: String,
    },

    /// A string that should be 64 hex digits naming a chunk is not.
    #[error("invalid chunk id {input:?}: {reason}")]
    InvalidChunkId {
        /// The text given (cut to a reasonable length).
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },

    /// Data to store is larger than anything the store will read back.
    #[error("{len} bytes is more than the store's limit of {max} bytes for one object")]
    TooLarge {
        /// The size offered.
        len: usize,
        /// The limit.
        max: usize,
    },

    /// A restore target already exists; a restore never writes over anything.
    #[error("restore target {} already exists", path.display())]
    TargetExists {
        /// The target.
        path: PathBuf,
    },

    /// A path given to the crate cannot be used as asked.
    #[error("{}: {reason}", path.display())]
    BadPath {
        /// The path.
        path: PathBuf,
        /// Why it cannot be used.
        reason: &'static str,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error on `path`, as [`Error::DiskFull`] when the file system is out of space.
    pub fn io(path: impl AsRef<Path>, source: io::Error) -> Error {
        let path = path.as_ref().to_path_buf();
        if is_out_of_space(&source) {
            Error::DiskFull { path }
        } else {
            Error::Io { path, source }
        }
    }

    /// An invalid manifest, with its reason.
    pub(crate) fn manifest(reason: impl Into<String>) -> Error {
        Error::InvalidManifest { reason: reason.into() }
    }

    /// A corrupt chunk, with its reason.
    pub(crate) fn corrupt(id: ChunkId, reason: impl Into<String>) -> Error {
        Error::Corrupt { id, reason: reason.into() }
    }
}

/// Whether `e` means the file system (or the user's quota on it) is full.
pub(crate) fn is_out_of_space(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
        || e.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error())
        || e.raw_os_error() == Some(rustix::io::Errno::DQUOT.raw_os_error())
}

/// Adds the path to a rustix error.
pub(crate) fn rio(path: impl AsRef<Path>, e: rustix::io::Errno) -> Error {
    Error::io(path, io::Error::from(e))
}
