//! Fused training ops that *do* record gradients: softmax and log-softmax over the last dim
//! and rotary embeddings, as candle custom ops with a hand-written backward.
//!
//! candle's fused `softmax_last_dim` and `rope` record no gradient, and their composed
//! differentiable forms (`ops::softmax`, `rope_slow`) cost five to ten tensor passes forward
//! and more backward. Here the forward is one pass over f32/f64 CPU data and the backward a
//! few tensor ops: softmax `dx = y ⊙ (g − Σ g⊙y)`, rope `dx = rope(g, cos, −sin)` (the inverse
//! rotation). Other devices and dtypes (CUDA, bf16) use the composed forms, so training works
//! everywhere; `tests` check both paths give the same gradients.

use candle_core::{CpuStorage, CustomOp1, D, Device, Layout, Shape, Tensor};

use crate::error::Result;

fn fused_ok(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu)
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// Softmax over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        Ok(x.contiguous()?.apply_op1(SoftmaxLastDim)?)
    } else {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    }
}

/// Log-softmax over the last dimension, differentiable (`dx = g − softmax(x) · Σ g`).
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        Ok(x.contiguous()?.apply_op1(LogSoftmaxLastDim)?)
    } else {
        Ok(candle_nn::ops::log_softmax(x, D::Minus1)?)
    }
}

/// Rotary embedding (`rotate_half` convention) of `x` `[b, h, t, d]` with `cos`/`sin`
/// `[t, d / 2]`, differentiable in `x`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if fused_ok(x) && cos.dtype() == x.dtype() {
        let op = Rope {
            cos: cos.contiguous()?,
            sin: sin.contiguous()?,
        };
        Ok(x.contiguous()?.apply_op1(op)?)
    } else {
        Ok(candle_nn::rotary_emb::rope_slow(x, cos, sin)?)
    }
}

struct SoftmaxLastDim;

macro_rules! softmax_rows {
    ($src:expr, $dim:expr, $t:ty) => {{
        let mut out: Vec<$t> = Vec::with_capacity($src.len());
        for row in $src.chunks_exact($dim) {
            let max = row.iter().copied().fold(<$t>::NEG_INFINITY, <$t>::max);
            let start = out.len();
            let mut sum = 0.0 as $t;
            for &v in row {
                let e = (v - max).exp();
                sum += e;
                out.push(e);
            }
            let inv = 1.0 / sum;
            for e in &mut out[start..] {
                *e *= inv;
            }
        }
        out
    }};
}

fn contiguous_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let (a, b) = l.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("fused training op needs contiguous input".into())
    })?;
    Ok(&s.as_slice::<T>()?[a..b])
}

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "lmforge-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dim = l.dims()[l.dims().len() - 1];
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(softmax_rows!(contiguous_slice::<f32>(s, l)?, dim, f32))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(softmax_rows!(contiguous_slice::<f64>(s, l)?, dim, f64))
            }
            _ => candle_core::bail!("lmforge softmax: f32/f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dot = (g * y)?.sum_keepdim(D::Minus1)?;
        Ok(Some((y * g.broadcast_sub(&dot)?)?))
    }
}

struct LogSoftmaxLastDim;

macro_rules! log_softmax_rows {
    ($src:expr, $dim:expr, $t:ty) => {{
        let mut out: Vec<$t> = Vec::with_capacity($src.len());
        for row in $src.chunks_exact($dim) {
            let max = row.iter().copied().fold(<$t>::NEG_INFINITY, <$t>::max);
            let lse = row.iter().map(|&v| (v - max).exp()).sum::<$t>().ln() + max;
            out.extend(row.iter().map(|&v| v - lse));
        }
        out
    }};
}

impl CustomOp1 for LogSoftmaxLastDim {
    fn name(&self) -> &'static str {
        "lmforge-log-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dim = l.dims()[l.dims().len() - 1];
        let out = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(log_softmax_rows!(contiguous_slice::<f32>(s, l)?, dim, f32))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(log_softmax_rows!(contiguous_slice::<f64>(s, l)?, dim, f64))
            }
            _ => candle_core::bail!("lmforge log-softmax: f32/f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let total = g.sum_keepdim(D::Minus1)?;
        Ok(Some((g - y.exp()?.broadcast_mul(&total)?)?))
    }
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
}

macro_rules! rope_rows {
    ($x:expr, $cos:expr, $sin:expr, $t:expr, $d:expr, $ty:ty) => {{
        let half = $d / 2;
        let mut out: Vec<$ty> = vec![0.0; $x.len()];
        for (r, (src, dst)) in $x
            .chunks_exact($d)
            .zip(out.chunks_exact_mut($d))
            .enumerate()
        {
            // Rows run over [b, h, t]; the position is the row index modulo t.
            let p = r % $t;
            let (c, s) = (
                &$cos[p * half..(p + 1) * half],
                &$sin[p * half..(p + 1) * half],
            );
            for i in 0..half {
                let (x1, x2) = (src[i], src[i + half]);
                dst[i] = x1 * c[i] - x2 * s[i];
                dst[i + half] = x2 * c[i] + x1 * s[i];
            }
        }
        out
    }};
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "lmforge-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        let (t, d) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        if self.cos.dims() != [t, d / 2] || self.sin.dims() != [t, d / 2] {
            candle_core::bail!(
                "lmforge rope: cos/sin {:?} do not fit input {:?}",
                self.cos.dims(),
                dims
            );
        }
        let out = match s {
            CpuStorage::F32(_) => {
                let (c, sn) = (
                    self.cos.flatten_all()?.to_vec1::<f32>()?,
                    self.sin.flatten_all()?.to_vec1::<f32>()?,
                );
                CpuStorage::F32(rope_rows!(contiguous_slice::<f32>(s, l)?, c, sn, t, d, f32))
            }
            CpuStorage::F64(_) => {
                let (c, sn) = (
                    self.cos.flatten_all()?.to_vec1::<f64>()?,
                    self.sin.flatten_all()?.to_vec1::<f64>()?,
                );
                CpuStorage::F64(rope_rows!(contiguous_slice::<f64>(s, l)?, c, sn, t, d, f64))
            }
            _ => candle_core::bail!("lmforge rope: f32/f64 only"),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // The rotation is orthogonal: its transpose is the rotation by the opposite angle.
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.neg()?,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn grads_agree(f: impl Fn(&Tensor) -> Tensor, g: impl Fn(&Tensor) -> Tensor, shape: &[usize]) {
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, shape, &Device::Cpu).expect("randn"))
            .expect("var");
        let w = Tensor::randn(0f64, 1.0, shape, &Device::Cpu).expect("randn");
        let (ya, yb) = (f(x.as_tensor()), g(x.as_tensor()));
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .expect("sub")
                .abs()
                .expect("abs")
                .flatten_all()
                .expect("f")
                .max(0)
                .expect("max")
                .to_scalar::<f64>()
                .expect("s")
        };
        assert!(diff(&ya, &yb) < 1e-12);
        let ga = (ya * &w)
            .expect("mul")
            .sum_all()
            .expect("sum")
            .backward()
            .expect("bwd");
        let gb = (yb * &w)
            .expect("mul")
            .sum_all()
            .expect("sum")
            .backward()
            .expect("bwd");
        let (ga, gb) = (
            ga.get(x.as_tensor()).expect("grad"),
            gb.get(x.as_tensor()).expect("grad"),
        );
        assert!(diff(ga, gb) < 1e-12, "gradients differ by {}", diff(ga, gb));
        assert!(
            ga.abs()
                .expect("abs")
                .sum_all()
                .expect("s")
                .to_scalar::<f64>()
                .expect("s")
                > 1e-3
        );
    }

    #[test]
    fn fused_softmax_matches_composed_in_value_and_gradient() {
        grads_agree(
            |x| softmax_last_dim(x).expect("fused"),
            |x| candle_nn::ops::softmax(x, D::Minus1).expect("composed"),
            &[2, 3, 5, 7],
        );
    }

    #[test]
    fn fused_log_softmax_matches_composed_in_value_and_gradient() {
        grads_agree(
            |x| log_softmax_last_dim(x).expect("fused"),
            |x| candle_nn::ops::log_softmax(x, D::Minus1).expect("composed"),
            &[4, 9],
        );
    }

    #[test]
    fn fused_rope_matches_rope_slow_in_value_and_gradient() {
        let cos = Tensor::randn(0f64, 1.0, (5, 4), &Device::Cpu).expect("randn");
        let sin = Tensor::randn(0f64, 1.0, (5, 4), &Device::Cpu).expect("randn");
        grads_agree(
            |x| rope(x, &cos, &sin).expect("fused"),
            |x| candle_nn::rotary_emb::rope_slow(x, &cos, &sin).expect("composed"),
            &[2, 3, 5, 8],
        );
    }
}
