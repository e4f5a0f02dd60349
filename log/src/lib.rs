//! The replicated event log of a coyote cluster: openraft over coyote's own store, replicated with tonic
//! gRPC over mutual TLS.
//!
//! - [`types`]: the openraft type configuration.
//! - [`store`]: the Raft log and vote (append-only segment files, [`filelog`]), the state-machine
//!   snapshot and the archive of applied events (sled).
//! - [`tls`]: the cluster CA, node certificates and the TLS configurations, including the pinned trust a
//!   joining server uses.
//! - [`network`]: Raft's RPCs over gRPC.
//! - [`cluster`]: a running member: proposals (forwarded to the leader), joins, membership changes.
//! - [`token`]: join tokens.
//! - [`runtime`]: openraft's async runtime, with a random source the simulator can seed.
//!
//! Servers take their listener and shutdown signal from the caller and clients take a dialer, so the
//! simulator can run this code over its own network.

pub mod cluster;
mod error;
pub mod filelog;
#[doc(hidden)]
pub mod fuzzing;
pub mod network;
pub mod runtime;
pub mod store;
pub mod tls;
pub mod token;
pub mod types;

/// Generated protobuf and gRPC code (`proto/coyote.proto`).
#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("coyote.v1");
}

pub use cluster::{
    Clock, ClusterStatus, Environment, LogNode, LogNodeConfig, MemberStatus, ProposeError, Proposed,
    RaftSettings,
};
pub use token::{JoinToken, TokenError};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("raft: {0}")]
    Raft(String),
    #[error("invalid raft settings: {0}")]
    Config(String),
    #[error("transport: {0}")]
    Transport(String),
    #[error("join failed: {0}")]
    Join(String),
    #[error(transparent)]
    Propose(#[from] ProposeError),
}
