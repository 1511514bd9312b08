//! A projection `y = x Wᵀ (+ b)` with the extras a serving/training model needs: an optional
//! LoRA adapter (`+ scale · B A x`), an optional q8_0 quantized weight for serving, and
//! seeded dropout ([`dropout`]) drawn from the crate's [`Rng`] so training is reproducible.

use candle_core::Tensor;

use crate::error::Result;
use crate::rng::Rng;

/// A LoRA adapter on one projection: `ΔW = (alpha / rank) · B A`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[rank, in]`, PEFT's `lora_A.weight`.
    pub a: Tensor,
    /// `[out, rank]`, PEFT's `lora_B.weight`.
    pub b: Tensor,
    /// `alpha / rank`.
    pub scale: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f32,
}

/// One linear projection of the transformer.
#[derive(Debug, Clone)]
pub struct Proj {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
    /// When set, serving uses this instead of `weight` (q8_0 weights).
    pub quantized: Option<std::sync::Arc<crate::quant::Q8Weight>>,
    /// `weight` packed for the serving forward's products (see [`crate::packed`]; all of
    /// them with AMX tiles, else up to `PackedWeight::max_rows` rows), set by
    /// [`crate::Model::pack_for_serving`].
    pub packed: Option<std::sync::Arc<crate::packed::PackedWeight>>,
}

/// Inverted dropout with a mask drawn from `rng`: each element is zeroed with probability `p`
/// and the rest scaled by `1 / (1 - p)`, so the expectation is unchanged.
pub fn dropout(x: &Tensor, p: f32, rng: &mut Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let mask = dropout_mask(x.elem_count(), p, rng);
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok(x.mul(&mask)?)
}

/// [`dropout`]'s multiplier for `len` elements: 0 with probability `p`, else `1 / (1 - p)`;
/// draws one uniform from `rng` per element.
pub fn dropout_mask(len: usize, p: f32, rng: &mut Rng) -> Vec<f32> {
    let keep = 1.0 / (1.0 - p as f64);
    (0..len)
        .map(|_| {
            if rng.uniform() < p as f64 {
                0.0
            } else {
                keep as f32
            }
        })
        .collect()
}

/// `x [n, in] · wᵀ [in, out]` for any number of leading dims of `x`.
fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let rows = x.elem_count() / inner;
    // Flatten to 2-D so the transposed weight is read in place by the gemm, never copied.
    let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
    let mut out = dims.to_vec();
    *out.last_mut().expect("x has at least one dim") = w.dim(0)?;
    Ok(y.reshape(out)?)
}

impl Proj {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
            quantized: None,
            packed: None,
        }
    }

    /// Apply the projection; `rng` is `Some` while training (enables LoRA dropout).
    pub fn forward(&self, x: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        self.apply(x, rng, false)
    }

    /// Apply the projection for serving: `x` is `[n, in]`; up to `PackedWeight::max_rows`
    /// rows (decode steps) use the packed weight when there is one. Records no gradient.
    pub fn forward_serving(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, None, true)
    }

    /// [`Self::forward_serving`] of several projections of the same input (a layer's q, k
    /// and v, or gate and up): their packed products in one pass where all of them have
    /// plain packed weights ([`PackedWeight::matmul_t_many`]), each on its own otherwise.
    /// Each result equals that projection's `forward_serving`.
    ///
    /// [`PackedWeight::matmul_t_many`]: crate::packed::PackedWeight::matmul_t_many
    pub fn forward_serving_many(projs: &[&Proj], x: &Tensor) -> Result<Vec<Tensor>> {
        let packed: Option<Vec<&crate::packed::PackedWeight>> = projs
            .iter()
            .map(|p| match &p.packed {
                Some(w) if p.quantized.is_none() && p.lora.is_none() => Some(&**w),
                _ => None,
            })
            .collect();
        // As in `apply`: `[n, in]` inputs of up to `max_rows` rows go to the packed weights.
        match (packed, x.dims()) {
            (Some(ws), &[rows, _]) if ws.iter().all(|w| rows <= w.max_rows()) => {
                let ys = crate::packed::PackedWeight::matmul_t_many(&ws, x)?;
                ys.into_iter()
                    .zip(projs)
                    .map(|(y, p)| match &p.bias {
                        Some(b) => Ok(y.broadcast_add(b)?),
                        None => Ok(y),
                    })
                    .collect()
            }
            _ => projs.iter().map(|p| p.forward_serving(x)).collect(),
        }
    }

    fn apply(&self, x: &Tensor, rng: Option<&mut Rng>, serving: bool) -> Result<Tensor> {
        // A released float weight (`quant::release_float_weights`) leaves the packed copy for
        // every forward, whatever the rank of `x`.
        let released = self.weight.dim(0)? == 0;
        let small = match &self.packed {
            Some(p) if self.quantized.is_none() && released => {
                let dims = x.dims();
                let inner = dims[dims.len() - 1];
                let y = p.matmul_t(&x.reshape((x.elem_count() / inner, inner))?)?;
                let mut out = dims.to_vec();
                *out.last_mut().expect("x has at least one dim") = y.dim(1)?;
                Some(y.reshape(out)?)
            }
            Some(p)
                if serving
                    && self.quantized.is_none()
                    && x.rank() == 2
                    && x.dim(0)? <= p.max_rows() =>
            {
                Some(p.matmul_t(x)?)
            }
            _ => None,
        };
        let mut y = match (&self.quantized, small) {
            (_, Some(y)) => y,
            (Some(q), None) => q.forward(x)?,
            (None, None) => matmul_t(x, &self.weight)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some(l) = &self.lora {
            let xin = match rng {
                Some(rng) => dropout(x, l.dropout, rng)?,
                None => x.clone(),
            };
            let delta = matmul_t(&matmul_t(&xin, &l.a)?, &l.b)?;
            y = (y + (delta * l.scale)?)?;
        }
        Ok(y)
    }
}
