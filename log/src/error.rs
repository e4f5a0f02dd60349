//! The store's error, shared by the store and the file log it keeps the Raft log in.

use std::path::PathBuf;

use serde::de::DeserializeOwned;

use coyote_state_machine::decode;

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The directory cannot be opened as a coyote store: missing permissions, locked by another process,
    /// damaged, or some other program's data.
    #[error("cannot open the store at {}: {reason}", path.display())]
    Open { path: PathBuf, reason: String },
    /// A record read from disk (or received in a snapshot) does not decode.
    #[error("{what} cannot be decoded: {reason}")]
    Corrupt { what: String, reason: String },
    /// Records decode but contradict each other or where they are stored.
    #[error("{what} is inconsistent: {reason}")]
    Inconsistent { what: String, reason: String },
    /// sled failed.
    #[error("cannot {action}: {source}")]
    Io {
        action: &'static str,
        #[source]
        source: sled::Error,
    },
    /// The blocking task that flushed or built a snapshot failed (it panicked or was cancelled).
    #[error("cannot {action}: the background task failed: {reason}")]
    Task { action: &'static str, reason: String },
}

pub(crate) fn io(action: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
    move |source| StoreError::Io { action, source }
}

pub(crate) fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt { what: what.into(), reason: reason.into() }
}

pub(crate) fn inconsistent(what: impl Into<String>, reason: impl Into<String>) -> StoreError {
    StoreError::Inconsistent { what: what.into(), reason: reason.into() }
}

/// Decodes a record read from disk; `what` names it in the error ("log entry 17").
pub(crate) fn decode_from_disk<T: DeserializeOwned>(
    bytes: &[u8],
    what: impl FnOnce() -> String,
) -> Result<T, StoreError> {
    decode(bytes).map_err(|e| {
        let reason = match e {
            coyote_state_machine::Error::Decode(reason) => reason,
            other => other.to_string(),
        };
        corrupt(what(), reason)
    })
}
