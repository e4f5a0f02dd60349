//! sled-backed storage (in progress)
