//! The replicated event log of a coyote cluster.

pub mod store;
pub mod tls;
pub mod types;
