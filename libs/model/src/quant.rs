//! q8_0 serving weights through candle's quantized matmul.
//!
//! [`quantize_q8_0`] gives every projection whose input width is a multiple of the 32-wide
//! q8_0 block a quantized copy that the serving forward uses instead of the float weight
//! (see `Proj::forward`); others stay in float, and norms and embeddings are never
//! quantized. Training should keep using the float weights.

use std::sync::Arc;

use candle_core::DType;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};

use crate::error::Result;
use crate::linear::Proj;
use crate::model::Model;

/// Width of a q8_0 block: a quantizable weight's input dimension must be a multiple of it.
pub const Q8_0_BLOCK: usize = 32;

fn quantize_proj(p: &mut Proj) -> Result<bool> {
    // candle's q8_0 matmul runs on its own spinning thread pool; rayon tasks from the packed
    // path in between make the two pools fight over the cores, so the float leftovers of a
    // quantized model go through the plain matmul.
    p.packed = None;
    if !p.weight.dim(1)?.is_multiple_of(Q8_0_BLOCK) {
        return Ok(false);
    }
    let w = p.weight.to_dtype(DType::F32)?;
    let q = QTensor::quantize(&w, GgmlDType::Q8_0)?;
    p.quantized = Some(Arc::new(QMatMul::from_qtensor(q)?));
    Ok(true)
}

/// Quantize `model`'s projections (and the LM head) to q8_0; returns how many were.
pub fn quantize_q8_0(model: &mut Model) -> Result<usize> {
    let mut n = 0;
    for p in model.projections_mut() {
        n += usize::from(quantize_proj(p)?);
    }
    Ok(n)
}
