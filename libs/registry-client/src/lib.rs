//! Client-side helpers for the registry service (`lmforge.v1.RegistryService`), shared by the
//! inference service, the trainer worker and the CLI:
//!
//! - [`fetch`]: resolve a model reference and download a version's files into a local cache
//!   keyed by digest, each file verified against its sha256;
//! - [`upload`]: check a Hugging Face checkpoint (or PEFT adapter) directory and register it as
//!   a new READY version, streaming every file.

pub mod fetch;
pub mod upload;
