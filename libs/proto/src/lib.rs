//! The lmforge v1 gRPC contract: prost messages and tonic clients/servers generated from
//! `proto/lmforge/v1/*.proto`, and the encoded file descriptor set that every server hands
//! to gRPC reflection.

/// Package `lmforge.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("lmforge.v1");
}

/// Encoded `FileDescriptorSet` of every lmforge proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lmforge_descriptor.bin"));
