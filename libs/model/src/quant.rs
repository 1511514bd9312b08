//! q8_0 serving weights.
//!
//! [`quantize_q8_0`] gives every projection whose input width is a multiple of the 32-wide
//! q8_0 block a quantized copy that the serving forward uses instead of the float weight
//! (see `Proj::forward`); others stay in float, and norms and embeddings are never
//! quantized. Training should keep using the float weights. On CPUs with AVX-512 VNNI the
//! copy is a [`PackedQ8`] (the same q8_0 numbers in panels for integer dot products); on
//! others it is candle's q8_0 matmul.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Tensor};

use crate::error::Result;
use crate::linear::Proj;
use crate::model::Model;
use crate::packed_q8::PackedQ8;

/// Width of a q8_0 block: a quantizable weight's input dimension must be a multiple of it.
pub const Q8_0_BLOCK: usize = 32;

/// A projection's q8_0 serving weight.
#[derive(Debug)]
pub enum Q8Weight {
    /// Packed for AVX-512 VNNI ([`crate::packed_q8`]).
    Packed(PackedQ8),
    /// candle's quantized matmul (ggml's block layout), everywhere else.
    Candle(QMatMul),
}

impl Q8Weight {
    /// Quantize a `[out, in]` weight (`in` a multiple of [`Q8_0_BLOCK`]) for this CPU.
    pub fn new(w: &Tensor) -> Result<Self> {
        if let Some(p) = PackedQ8::quantize(w)? {
            return Ok(Self::Packed(p));
        }
        Self::candle(w)
    }

    /// Bytes the quantized copy takes.
    pub fn bytes(&self) -> u64 {
        match self {
            Self::Packed(p) => p.bytes(),
            Self::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes() as u64,
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => tensor_bytes(t),
        }
    }

    /// candle's q8_0 matmul of `w`, whatever the CPU.
    pub fn candle(w: &Tensor) -> Result<Self> {
        let q = QTensor::quantize(&w.to_dtype(DType::F32)?, GgmlDType::Q8_0)?;
        Ok(Self::Candle(QMatMul::from_qtensor(q)?))
    }

    /// `x [.., in] · wᵀ`, in `x`'s dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Packed(p) => {
                let dims = x.dims();
                let inner = dims[dims.len() - 1];
                let y = p.matmul_t(&x.reshape((x.elem_count() / inner, inner))?)?;
                let mut out = dims.to_vec();
                *out.last_mut().expect("x has at least one dim") = y.dim(1)?;
                y.reshape(out)?.to_dtype(x.dtype())?
            }
            Self::Candle(q) => q.forward(x)?,
        })
    }
}

impl Model {
    /// Whether any projection runs on candle's q8_0 matmul ([`Q8Weight::Candle`]).
    pub fn uses_candle_q8_0(&self) -> bool {
        let candle = |p: &Proj| matches!(p.quantized.as_deref(), Some(Q8Weight::Candle(_)));
        candle(&self.lm_head)
            || self.layers.iter().any(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .into_iter()
                    .any(candle)
            })
    }
}

fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// For a model that only serves from now on: drop the float weight of every quantized
/// projection (a q8_0 model otherwise holds its f32 weights too, ~4× the q8_0 copy), and of
/// every packed one whose packed copy takes every row count (with AMX tiles,
/// [`crate::packed::PackedWeight::takes_every_row`]), and return the bytes of what the model still holds: float tensors
/// (each once: a tied LM head shares the embedding), q8_0 copies, packed copies, biases and
/// adapters.
///
/// The released weights become empty `[0, in]` tensors: such a model can still run every
/// forward (on its q8_0 or packed copies), but no longer be trained, saved, merged or packed.
pub fn release_float_weights(model: &mut Model) -> Result<u64> {
    let embed = model.embed.id();
    let mut bytes = tensor_bytes(&model.embed) + tensor_bytes(&model.norm);
    for l in &model.layers {
        bytes += tensor_bytes(&l.input_norm) + tensor_bytes(&l.post_norm);
    }
    for p in model.projections_mut() {
        if let Some(q) = &p.quantized {
            let k = p.weight.dim(1)?;
            p.weight = Tensor::zeros((0, k), p.weight.dtype(), p.weight.device())?;
            bytes += q.bytes();
        } else if p.packed.as_ref().is_some_and(|q| q.takes_every_row()) && p.weight.id() != embed {
            let k = p.weight.dim(1)?;
            p.weight = Tensor::zeros((0, k), p.weight.dtype(), p.weight.device())?;
        } else if p.weight.id() != embed {
            bytes += tensor_bytes(&p.weight);
        }
        if let Some(packed) = &p.packed {
            bytes += packed.bytes();
        }
        bytes += p.bias.as_ref().map_or(0, tensor_bytes);
        if let Some(l) = &p.lora {
            bytes += tensor_bytes(&l.a) + tensor_bytes(&l.b);
        }
    }
    Ok(bytes)
}

fn quantize_proj(p: &mut Proj) -> Result<bool> {
    if p.quantized.is_some() {
        return Ok(true);
    }
    // candle's q8_0 matmul runs on its own spinning thread pool; rayon tasks from the packed
    // path in between make the two pools fight over the cores, so the float leftovers of a
    // quantized model go through the plain matmul.
    p.packed = None;
    if !p.weight.dim(1)?.is_multiple_of(Q8_0_BLOCK) {
        return Ok(false);
    }
    p.quantized = Some(Arc::new(Q8Weight::new(&p.weight)?));
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

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn answers_in_the_input_dtype() {
        // Models served in bf16 or f16 feed their activations to the q8_0 product as they are.
        let w = Tensor::randn(0f32, 1.0, (70, 64), &Device::Cpu).expect("randn");
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &Device::Cpu).expect("randn");
        for q in [
            Q8Weight::new(&w).expect("q8"),
            Q8Weight::candle(&w).expect("q8"),
        ] {
            let want = q.forward(&x).expect("f32");
            assert_eq!(want.dims(), &[2, 3, 70]);
            for dtype in [DType::BF16, DType::F16] {
                let y = q
                    .forward(&x.to_dtype(dtype).expect("cast"))
                    .expect("forward");
                assert_eq!((y.dtype(), y.dims()), (dtype, want.dims()));
            }
        }
    }
}
