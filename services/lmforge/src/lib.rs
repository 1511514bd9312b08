//! The `lmforge` CLI as a library, so that end-to-end tests drive exactly what users run.
//!
//! - [`stack`]: every service in one process (`lmforge up`, `lmforge demo`, the e2e tests).
//! - [`model_cmd`]: `lmforge model …` against the registry.
//! - [`dataset_cmd`]: `lmforge dataset …` against the ingest service.
//! - [`key_cmd`]: `lmforge key …` against the gateway's admin API.
//! - [`probe`]: asking a running server what it serves and whether it is healthy.
//! - [`generate_cmd`]: `lmforge generate`, one streamed generation.
//! - [`bench_serve`]: `lmforge bench serve`, the inference load generator.

pub mod bench_serve;
pub mod dataset_cmd;
pub mod generate_cmd;
pub mod job_cmd;
pub mod journey;
pub mod key_cmd;
pub mod model_cmd;
pub mod probe;
pub mod stack;
