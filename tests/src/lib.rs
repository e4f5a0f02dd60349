//! Helpers for driving real coyote processes.
