//! Memory-mapped reads of `.safetensors` files: the only `unsafe` in lmforge.
//!
//! Mapping instead of reading the file whole means a checkpoint is never held twice (file
//! bytes plus tensors): pages are read on demand while each tensor is copied out, and the
//! page cache can drop them right after.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::error::{ModelError, Result};

/// Reads every tensor of one `.safetensors` file into CPU tensors through a memory map.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let checkpoint = |e: candle_core::Error| ModelError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    // SAFETY: the map is read-only and dropped before this function returns, after every
    // tensor has been copied into memory of its own. A checkpoint file is immutable once
    // written (the registry stores blobs by content hash and writes them under a staging
    // name first), so nothing truncates or rewrites it while it is mapped; a file changed
    // underneath anyway could raise SIGBUS, which is the documented risk of any mmap.
    let mapped =
        unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(checkpoint)?;
    let mut tensors = HashMap::new();
    for (name, _) in mapped.tensors() {
        let tensor = mapped.load(&name, &Device::Cpu).map_err(checkpoint)?;
        tensors.insert(name, tensor);
    }
    Ok(tensors)
}
