//! Client-side helpers for the registry service (`lmforge.v1.RegistryService`), shared by the
//! inference service, the trainer worker and the CLI:
//!
//! - [`fetch`]: resolve a model reference and download a version's files into a local cache
//!   keyed by digest, each file verified against its sha256;
//! - [`upload`]: check a Hugging Face checkpoint (or PEFT adapter) directory and register it as
//!   a new READY version, streaming every file.

pub mod fetch;
pub mod upload;

/// What a registry client can run on: a plain `tonic` channel, or one wrapped in layers (e.g.
/// `lmforge_telemetry::propagation::TracedChannel`, which carries the caller's trace).
pub trait Transport:
    tonic::client::GrpcService<
        tonic::body::Body,
        Error: Into<tonic::codegen::StdError>,
        ResponseBody: tonic::codegen::Body<
            Data = tonic::codegen::Bytes,
            Error: Into<tonic::codegen::StdError> + Send,
        > + Send
                          + 'static,
        Future: Send,
    > + Clone
    + Send
    + Sync
    + 'static
{
}

impl<T> Transport for T where
    T: tonic::client::GrpcService<
            tonic::body::Body,
            Error: Into<tonic::codegen::StdError>,
            ResponseBody: tonic::codegen::Body<
                Data = tonic::codegen::Bytes,
                Error: Into<tonic::codegen::StdError> + Send,
            > + Send
                              + 'static,
            Future: Send,
        > + Clone
        + Send
        + Sync
        + 'static
{
}
