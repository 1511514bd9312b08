//! The `lmforge` CLI as a library, so that end-to-end tests drive exactly what users run.
//!
//! - [`stack`]: every service in one process (`lmforge up`, `lmforge demo`, the e2e tests).
//! - [`probe`]: asking a running server what it serves and whether it is healthy.

pub mod probe;
pub mod stack;
