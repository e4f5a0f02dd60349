//! cluster TLS (in progress)
