//! The `lmforge` CLI as a library, so that end-to-end tests drive exactly what users run.
//!
//! - [`stack`]: every service in one process (`lmforge up`, `lmforge demo`, the e2e tests).
//! - [`model_cmd`]: `lmforge model …` against the registry.
//! - [`probe`]: asking a running server what it serves and whether it is healthy.

pub mod model_cmd;
pub mod probe;
pub mod stack;
