//! Compiles every `proto/lmforge/v1/*.proto` with `protox` (pure Rust, so no `protoc` is
//! needed) and generates prost messages plus tonic clients and servers. The encoded file
//! descriptor set is written next to the generated code for gRPC reflection.

use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let package_dir = proto_root.join("lmforge/v1");

    let mut files: Vec<PathBuf> = std::fs::read_dir(&package_dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "proto"))
        .collect();
    files.sort();
    println!("cargo:rerun-if-changed={}", package_dir.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let descriptors = protox::compile(&files, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("lmforge_descriptor.bin");
    std::fs::write(
        &descriptor_path,
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Services that a later issue has not implemented yet answer UNIMPLEMENTED per method
        // instead of failing to compile; implemented methods override the default.
        .generate_default_stubs(true)
        .compile_fds(descriptors)?;
    let _ = Path::new(&descriptor_path);
    Ok(())
}
