//! The llama-family transformer (Llama, Mistral, Qwen2) and its training forward.
//!
//! [`Model::new`] binds a [`VarMap`] of HF-named weights into layers (the model holds clones
//! of the vars' tensors, so optimizer updates are seen at once). [`Model::forward_train`]
//! returns logits at every position with causal + padding (+ sliding-window) masks and
//! optional seeded dropout, using only ops that record gradients: rope and softmax from
//! `train_ops` (fused, with a hand-written backward) and an explicit RMS norm (candle's own
//! fused kernels silently drop gradients). The batched,
//! paged-KV-cache inference forward lives in `infer.rs`; rotary tables are built here.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarMap;

use crate::config::{ModelConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::linear::{Proj, dropout};
use crate::rng::Rng;
use crate::train_ops;
use crate::weights;

/// One decoder layer's weights.
#[derive(Debug, Clone)]
pub struct Layer {
    pub input_norm: Tensor,
    pub q: Proj,
    pub k: Proj,
    pub v: Proj,
    pub o: Proj,
    pub post_norm: Tensor,
    pub gate: Proj,
    pub up: Proj,
    pub down: Proj,
}

/// A llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Model {
    pub config: ModelConfig,
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// The output projection; shares the embedding tensor when embeddings are tied.
    pub lm_head: Proj,
    /// Rotary tables `[max_positions, head_dim / 2]` in the model dtype.
    pub cos: Tensor,
    pub sin: Tensor,
}

/// Rotary inverse frequencies, with `rope_scaling` applied (as `transformers` computes them).
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match &cfg.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

fn rope_tables(cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
    let inv = rope_inv_freq(cfg);
    let n = cfg.max_position_embeddings;
    let half = inv.len();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for p in 0..n {
        for f in &inv {
            // transformers computes the angle in f32; do the same so tables agree bit for bit.
            let angle = (p as f32) * (*f as f32);
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    let mk = |v: Vec<f32>| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, (n, half), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    };
    Ok((mk(cos)?, mk(sin)?))
}

/// RMS norm from differentiable primitives, computed in f32 or wider as `transformers` does.
pub fn rms_norm_train(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = match dtype {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    Ok(normed.to_dtype(dtype)?.broadcast_mul(weight)?)
}

/// Additive mask value for blocked attention, representable in `dtype`.
pub(crate) fn mask_value(dtype: DType) -> f32 {
    match dtype {
        DType::F16 => -65_504.0,
        _ => -1e9,
    }
}

impl Model {
    /// Every layer's seven projections, then the LM head.
    pub fn projections_mut(&mut self) -> impl Iterator<Item = &mut Proj> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                [
                    &mut l.q,
                    &mut l.k,
                    &mut l.v,
                    &mut l.o,
                    &mut l.gate,
                    &mut l.up,
                    &mut l.down,
                ]
            })
            .chain(std::iter::once(&mut self.lm_head))
    }

    /// Bind the weights in `map` (HF names) for `config`.
    pub fn new(config: &ModelConfig, map: &VarMap) -> Result<Self> {
        config.validate()?;
        let embed = weights::get(map, "model.embed_tokens.weight")?;
        let (dtype, device) = (embed.dtype(), embed.device().clone());
        let proj = |name: String, bias: bool| -> Result<Proj> {
            let b = if bias {
                Some(weights::get(map, &format!("{name}.bias"))?)
            } else {
                None
            };
            Ok(Proj::new(weights::get(map, &format!("{name}.weight"))?, b))
        };
        let layers = (0..config.num_hidden_layers)
            .map(|l| {
                let p = format!("model.layers.{l}");
                let ab = config.attention_bias;
                Ok(Layer {
                    input_norm: weights::get(map, &format!("{p}.input_layernorm.weight"))?,
                    q: proj(format!("{p}.self_attn.q_proj"), ab)?,
                    k: proj(format!("{p}.self_attn.k_proj"), ab)?,
                    v: proj(format!("{p}.self_attn.v_proj"), ab)?,
                    o: proj(format!("{p}.self_attn.o_proj"), false)?,
                    post_norm: weights::get(map, &format!("{p}.post_attention_layernorm.weight"))?,
                    gate: proj(format!("{p}.mlp.gate_proj"), false)?,
                    up: proj(format!("{p}.mlp.up_proj"), false)?,
                    down: proj(format!("{p}.mlp.down_proj"), false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if config.tie_word_embeddings {
            Proj::new(embed.clone(), None)
        } else {
            Proj::new(weights::get(map, "lm_head.weight")?, None)
        };
        let (cos, sin) = rope_tables(config, dtype, &device)?;
        Ok(Self {
            config: config.clone(),
            embed,
            layers,
            norm: weights::get(map, "model.norm.weight")?,
            lm_head,
            cos,
            sin,
        })
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Additive attention mask `[b, 1, 1, t, t]`: causal, sliding window, and key padding.
    fn train_mask(&self, b: usize, t: usize, attention_mask: Option<&Tensor>) -> Result<Tensor> {
        let keys: Option<Vec<Vec<f32>>> = match attention_mask {
            Some(m) => {
                if m.dims() != [b, t] {
                    return Err(ModelError::input(
                        "attention_mask",
                        format!("shape {:?}, expected [{b}, {t}]", m.dims()),
                    ));
                }
                Some(m.to_dtype(DType::F32)?.to_vec2()?)
            }
            None => None,
        };
        let neg = mask_value(self.dtype());
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
        let mut data = Vec::with_capacity(b * t * t);
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    let pad = keys.as_ref().is_some_and(|k| k[bi][j] == 0.0);
                    let visible = j <= i && i - j < window && !pad;
                    data.push(if visible { 0.0 } else { neg });
                }
            }
        }
        Ok(Tensor::from_vec(data, (b, 1, 1, t, t), self.device())?.to_dtype(self.dtype())?)
    }

    /// Logits `[b, t, vocab]` at every position of `input_ids` (`[b, t]`, u32).
    ///
    /// `attention_mask` (`[b, t]`, 1 = token, 0 = padding) hides padding keys; `train`
    /// carries the dropout probability and the generator its masks come from.
    pub fn forward_train(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: Option<(f32, &mut Rng)>,
    ) -> Result<Tensor> {
        let x = self.forward_train_hidden(input_ids, attention_mask, train)?;
        self.lm_head.forward(&x, None)
    }

    /// [`Self::forward_train`] up to the LM head: the final-normed hidden states `[b, t,
    /// hidden]`.
    pub fn forward_train_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        mut train: Option<(f32, &mut Rng)>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        if t > self.config.max_position_embeddings {
            return Err(ModelError::input(
                "input_ids",
                format!("{t} positions exceed max_position_embeddings"),
            ));
        }
        let cfg = &self.config;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let groups = nh / nkv;
        let mask = self.train_mask(b, t, attention_mask)?;
        let cos = self.cos.narrow(0, 0, t)?;
        let sin = self.sin.narrow(0, 0, t)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut x = self
            .embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, cfg.hidden_size))?;
        for layer in &self.layers {
            let h = rms_norm_train(&x, &layer.input_norm, cfg.rms_norm_eps)?;
            let mut rng = train.as_mut().map(|(_, r)| &mut **r);
            let heads = |p: &Proj, n: usize, rng: Option<&mut Rng>| -> Result<Tensor> {
                Ok(p.forward(&h, rng)?
                    .reshape((b, t, n, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let q = heads(&layer.q, nh, rng.as_deref_mut())?;
            let k = heads(&layer.k, nkv, rng.as_deref_mut())?;
            let v = heads(&layer.v, nkv, rng.as_deref_mut())?;
            let q = train_ops::rope(&q, &cos, &sin)?;
            let k = train_ops::rope(&k, &cos, &sin)?;
            // Grouped-query attention without copying k/v per query head: the `groups` query
            // heads that share kv head j are rows of one matmul against it.
            // Scale q (t·d elements) rather than the scores (t·t).
            let q = (q * scale)?.reshape((b, nkv, groups * t, hd))?;
            let scores = q.matmul(&k.t()?)?.reshape((b, nkv, groups, t, t))?;
            let probs = train_ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
            let att = probs.reshape((b, nkv, groups * t, t))?.matmul(&v)?;
            let att = att
                .reshape((b, nh, t, hd))?
                .transpose(1, 2)?
                .reshape((b, t, nh * hd))?;
            let mut o = layer.o.forward(&att, rng)?;
            if let Some((p, r)) = train.as_mut() {
                o = dropout(&o, *p, r)?;
            }
            x = (x + o)?;
            let h = rms_norm_train(&x, &layer.post_norm, cfg.rms_norm_eps)?;
            let mut rng = train.as_mut().map(|(_, r)| &mut **r);
            let g = layer.gate.forward(&h, rng.as_deref_mut())?.silu()?;
            let u = layer.up.forward(&h, rng.as_deref_mut())?;
            let mut m = layer.down.forward(&(g * u)?, rng)?;
            if let Some((p, r)) = train.as_mut() {
                m = dropout(&m, *p, r)?;
            }
            x = (x + m)?;
        }
        rms_norm_train(&x, &self.norm, cfg.rms_norm_eps)
    }
}
