//! The serving forward: one call over a batch of sequences at different positions, each
//! bringing a prefill chunk of a new prompt or one decode token, with keys and values kept in
//! a [`PagedKvCache`].
//!
//! Tokens of all sequences are flattened into one `[N, hidden]` matrix so every projection
//! and MLP is one matmul for the whole batch; only attention is per sequence, against that
//! sequence's own blocks. Fused kernels (`rope_thd`, `rms_norm`, `softmax_last_dim`) are used
//! here because no gradient is needed.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::kv_cache::{BlockTable, PagedKvCache};
use crate::model::{Model, mask_value};

/// One sequence's part of a batched forward: the new tokens and its block table.
/// The tokens take positions `table.len ..`; the table is advanced by the forward.
#[derive(Debug)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    pub table: &'a mut BlockTable,
}

impl Model {
    /// Run the batch, write the new keys/values to `cache`, and return the logits of each
    /// sequence's last new token, `[num_seqs, vocab]` (f32).
    pub fn forward_batch(
        &self,
        cache: &mut PagedKvCache,
        seqs: &mut [SeqInput<'_>],
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (nh, nkv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let groups = nh / nkv;
        let device = self.device().clone();
        if seqs.is_empty() || seqs.iter().any(|s| s.tokens.is_empty()) {
            return Err(ModelError::input(
                "seqs",
                "every sequence needs at least one new token",
            ));
        }
        let needed: usize = seqs
            .iter()
            .map(|s| cache.blocks_needed(s.table, s.tokens.len()))
            .sum();
        if needed > cache.num_free_blocks() {
            return Err(ModelError::KvCache(format!(
                "batch needs {needed} new blocks, {} free",
                cache.num_free_blocks()
            )));
        }
        // Validate everything before reserving, so a rejected batch holds no new blocks.
        if let Some(s) = seqs
            .iter()
            .find(|s| s.table.len + s.tokens.len() > cfg.max_position_embeddings)
        {
            return Err(ModelError::input(
                "tokens",
                format!(
                    "position {} exceeds max_position_embeddings",
                    s.table.len + s.tokens.len()
                ),
            ));
        }
        let mut ids = Vec::new();
        let mut positions = Vec::new();
        for s in seqs.iter_mut() {
            let end = s.table.len + s.tokens.len();
            cache.reserve(s.table, s.tokens.len())?;
            ids.extend_from_slice(s.tokens);
            positions.extend((s.table.len..end).map(|p| p as u32));
        }
        let n = ids.len();
        let pos_t = Tensor::new(positions.as_slice(), &device)?;
        let cos = self.cos.index_select(&pos_t, 0)?;
        let sin = self.sin.index_select(&pos_t, 0)?;
        // Per sequence: offset into the flat batch, start position, slots of its whole context
        // and (for chunks longer than one token, or with a sliding window) an additive mask.
        let mut plans = Vec::with_capacity(seqs.len());
        let mut offset = 0;
        for s in seqs.iter() {
            let (start, len) = (s.table.len, s.tokens.len());
            let ctx = start + len;
            let slots: Vec<u32> = (0..ctx).map(|p| cache.slot(s.table, p) as u32).collect();
            let mask = self.chunk_mask(start, len, &device)?;
            plans.push((
                offset,
                start,
                len,
                Tensor::new(slots.as_slice(), &device)?,
                mask,
            ));
            offset += len;
        }
        let scale = 1.0 / (hd as f64).sqrt();
        let eps = cfg.rms_norm_eps as f32;
        let mut x = self
            .embed
            .index_select(&Tensor::new(ids.as_slice(), &device)?, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, eps)?;
            let q = layer.q.forward_serving(&h)?.reshape((1, n, nh, hd))?;
            let k = layer.k.forward_serving(&h)?.reshape((1, n, nkv, hd))?;
            let v = layer.v.forward_serving(&h)?.reshape((n, nkv, hd))?;
            let q = candle_nn::rotary_emb::rope_thd(&q.contiguous()?, &cos, &sin)?.squeeze(0)?;
            let k = candle_nn::rotary_emb::rope_thd(&k.contiguous()?, &cos, &sin)?.squeeze(0)?;
            let mut outs = Vec::with_capacity(plans.len());
            for (seq, (off, start, len, slots, mask)) in seqs.iter().zip(&plans) {
                cache.write(
                    li,
                    seq.table,
                    *start,
                    &k.narrow(0, *off, *len)?,
                    &v.narrow(0, *off, *len)?,
                )?;
                let (kc, vc) = cache.gather(li, slots)?;
                let ctx = start + len;
                let kc = kc.transpose(0, 1)?.contiguous()?; // [nkv, ctx, hd]
                let vc = vc.transpose(0, 1)?.contiguous()?;
                // [len, nh, hd] -> [nkv, groups * len, hd]: query heads sharing a kv head
                // become rows of one matmul.
                let qs = q
                    .narrow(0, *off, *len)?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((nkv, groups * len, hd))?;
                let mut scores = (qs.matmul(&kc.t()?)? * scale)?;
                if let Some(m) = mask {
                    scores = scores
                        .reshape((nkv, groups, *len, ctx))?
                        .broadcast_add(m)?
                        .reshape((nkv, groups * len, ctx))?;
                }
                let probs = candle_nn::ops::softmax_last_dim(&scores)?;
                let att = probs
                    .matmul(&vc)?
                    .reshape((nh, *len, hd))?
                    .transpose(0, 1)?
                    .reshape((*len, nh * hd))?;
                outs.push(att);
            }
            let att = Tensor::cat(&outs, 0)?;
            x = (x + layer.o.forward_serving(&att)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_norm, eps)?;
            let g = layer.gate.forward_serving(&h)?.silu()?;
            let u = layer.up.forward_serving(&h)?;
            x = (x + layer.down.forward_serving(&(g * u)?)?)?;
        }
        let last: Vec<u32> = plans
            .iter()
            .map(|(off, _, len, _, _)| (off + len - 1) as u32)
            .collect();
        let x = x.index_select(&Tensor::new(last.as_slice(), &device)?, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        let logits = self.lm_head.forward_serving(&x)?.to_dtype(DType::F32)?;
        for s in seqs.iter_mut() {
            s.table.len += s.tokens.len();
        }
        Ok(logits)
    }

    /// Additive mask `[len, start + len]` for a chunk at `start`, or `None` when every cached
    /// key is visible (a single decode token without a sliding window).
    fn chunk_mask(&self, start: usize, len: usize, device: &Device) -> Result<Option<Tensor>> {
        let ctx = start + len;
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
        if len == 1 && ctx <= window {
            return Ok(None);
        }
        let neg = mask_value(self.dtype());
        let mut m = Vec::with_capacity(len * ctx);
        for i in 0..len {
            let qpos = start + i;
            for kpos in 0..ctx {
                m.push(if kpos <= qpos && qpos - kpos < window {
                    0.0
                } else {
                    neg
                });
            }
        }
        Ok(Some(
            Tensor::from_vec(m, (len, ctx), device)?.to_dtype(self.dtype())?,
        ))
    }
}
