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

/// `silu(g) · u`, the MLP's gate: for contiguous f32 CPU tensors one parallel pass with the
/// sampler's vectorised exp (candle's `silu` calls libm's `expf` per element, 6% of a
/// prefill), candle ops otherwise.
fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    use candle_core::Storage;
    use rayon::prelude::*;
    let fallback = || -> Result<Tensor> { Ok((g.silu()? * u)?) };
    if g.dtype() != DType::F32 || u.dtype() != DType::F32 || g.shape() != u.shape() {
        return fallback();
    }
    let (gst, gl) = g.storage_and_layout();
    let (ust, ul) = u.storage_and_layout();
    let (Storage::Cpu(gc), Storage::Cpu(uc)) = (&*gst, &*ust) else {
        return fallback();
    };
    let (Some((g0, g1)), Some((u0, u1))) = (gl.contiguous_offsets(), ul.contiguous_offsets())
    else {
        return fallback();
    };
    let (gs, us) = (
        &gc.as_slice::<f32>()?[g0..g1],
        &uc.as_slice::<f32>()?[u0..u1],
    );
    let mut out = vec![0f32; gs.len()];
    const CHUNK: usize = 4096;
    out.par_chunks_mut(CHUNK)
        .zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| {
            pulp::Arch::new().dispatch(|| {
                for ((o, &x), &u) in o.iter_mut().zip(g).zip(u) {
                    // σ(x) from e^-|x| ≤ 1, which never overflows.
                    let e = crate::sampling::exp_nonpositive(-x.abs());
                    let sigmoid = if x >= 0.0 { 1.0 } else { e } / (1.0 + e);
                    *o = x * sigmoid * u;
                }
            })
        });
    drop((gst, ust));
    Ok(Tensor::from_vec(out, g.shape(), g.device())?)
}

/// Keeps the rayon pool's other workers awake, taking work, until dropped.
///
/// Between two products of a decode step the forward thread runs a few small ops (tens of
/// microseconds), long enough for idle rayon workers to go to sleep on a futex; every product
/// then paid a wake-up system call and the sleeper's scheduling delay before its other half
/// could start, about a fifth of a `small` batch-1 decode step. Each other worker instead
/// runs a job that takes pending rayon work ([`rayon::yield_now`]) and spins while there is
/// none, until the forward ends.
///
/// A worker waiting inside a join may pick that job up too, which holds the waiting frame
/// until the job returns. So: the forward thread's own copy returns at once (it never waits
/// on itself); only one forward in the process keeps workers awake at a time (concurrent
/// forwards of other models run as before, and no two spinning jobs can each hold a frame
/// the other's forward needs); and a job that finds no work for [`MAX_IDLE`] returns
/// anyway, so anything below it resumes soon whatever happens.
struct KeepWorkersAwake {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    owner: bool,
}

/// Whether some forward is keeping the workers awake.
static AWAKE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// How long a spinning worker waits for work before it returns to rayon's own idling.
const MAX_IDLE: std::time::Duration = std::time::Duration::from_micros(500);

impl KeepWorkersAwake {
    fn start() -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let done = std::sync::Arc::new(AtomicBool::new(false));
        let owner = rayon::current_num_threads() > 1
            && AWAKE
                .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                .is_ok();
        if owner {
            let here = rayon::current_thread_index();
            let flag = done.clone();
            rayon::spawn_broadcast(move |ctx| {
                if Some(ctx.index()) == here {
                    return;
                }
                let mut idle_since = std::time::Instant::now();
                let mut spins = 0u32;
                while !flag.load(Ordering::Acquire) {
                    if rayon::yield_now() == Some(rayon::Yield::Executed) {
                        idle_since = std::time::Instant::now();
                        continue;
                    }
                    std::hint::spin_loop();
                    spins = spins.wrapping_add(1);
                    if spins.is_multiple_of(256) {
                        if idle_since.elapsed() > MAX_IDLE {
                            return;
                        }
                        // Let the OS run another thread, in case the pool has more threads
                        // than the machine has free cores (the forward's own included).
                        std::thread::yield_now();
                    }
                }
            });
        }
        Self { done, owner }
    }
}

impl Drop for KeepWorkersAwake {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.done.store(true, Ordering::Release);
        if self.owner {
            AWAKE.store(false, Ordering::Release);
        }
    }
}

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
    ///
    /// The forward runs on a rayon worker: each packed product ([`crate::packed`]) then keeps one
    /// share of its rows on the current worker and hands the rest to the others, instead of
    /// the caller blocking while every worker is woken for every one of the ~200 products of
    /// a step (about 20% of a `small` batch-1 decode step). Meanwhile the other workers stay
    /// awake ([`KeepWorkersAwake`]).
    pub fn forward_batch(
        &self,
        cache: &mut PagedKvCache,
        seqs: &mut [SeqInput<'_>],
    ) -> Result<Tensor> {
        rayon::scope(|_| {
            // candle's q8_0 matmul (CPUs without AVX-512 VNNI) runs its own spinning pool:
            // spinning rayon workers would take its cores.
            let _awake = (!self.uses_candle_q8_0()).then(KeepWorkersAwake::start);
            self.forward_batch_on_worker(cache, seqs)
        })
    }

    fn forward_batch_on_worker(
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
            // Decode tokens attend as a group (see DecodeGroup): their per-sequence slots and
            // masks would go unused.
            let (slots, mask) = if len == 1 {
                (Vec::new(), None)
            } else {
                (
                    (0..ctx).map(|p| cache.slot(s.table, p) as u32).collect(),
                    self.chunk_mask(start, len, &device)?,
                )
            };
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
        // Every new token's cache slot: one scatter per layer writes the whole batch.
        let new_slots: Vec<u32> = seqs
            .iter()
            .flat_map(|s| {
                let start = s.table.len;
                (start..start + s.tokens.len()).map(|p| cache.slot(s.table, p) as u32)
            })
            .collect();
        let write_idx = Tensor::new(new_slots.as_slice(), &device)?
            .reshape((n, 1, 1))?
            .broadcast_as((n, nkv, hd))?
            .contiguous()?;
        // Decode tokens (one new token per sequence) share one batched attention over their
        // contexts padded to the longest; prefill chunks keep a per-sequence attention.
        let decode = DecodeGroup::new(self, cache, seqs, &plans, &device)?;
        let prefill: Vec<usize> = (0..plans.len())
            .filter(|&i| plans[i].2 > 1 || decode.is_none())
            .collect();
        // Rows of the attention output in the order its pieces are concatenated, and the
        // inverse permutation back to batch order (None when they already agree).
        let mut piece_rows: Vec<u32> = Vec::with_capacity(n);
        for &i in &prefill {
            let (off, _, len, _, _) = &plans[i];
            piece_rows.extend((*off..off + len).map(|r| r as u32));
        }
        if let Some(d) = &decode {
            piece_rows.extend(d.rows.iter().copied());
        }
        let unpermute = if piece_rows.iter().enumerate().all(|(i, &r)| i as u32 == r) {
            None
        } else {
            let mut inv = vec![0u32; n];
            for (pos, &row) in piece_rows.iter().enumerate() {
                inv[row as usize] = pos as u32;
            }
            Some(Tensor::new(inv.as_slice(), &device)?)
        };
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
            cache.k[li].scatter_set(&write_idx, &k.contiguous()?, 0)?;
            cache.v[li].scatter_set(&write_idx, &v.contiguous()?, 0)?;
            let mut outs = Vec::with_capacity(prefill.len() + 1);
            for &i in &prefill {
                let (off, start, len, slots, mask) = &plans[i];
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
            if let Some(d) = &decode {
                outs.push(d.attend(cache, li, &q, scale)?);
            }
            let mut att = if outs.len() == 1 {
                outs.pop().expect("one piece")
            } else {
                Tensor::cat(&outs, 0)?
            };
            if let Some(inv) = &unpermute {
                att = att.index_select(inv, 0)?;
            }
            x = (x + layer.o.forward_serving(&att)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_norm, eps)?;
            let g = layer.gate.forward_serving(&h)?;
            let u = layer.up.forward_serving(&h)?;
            x = (x + layer.down.forward_serving(&silu_mul(&g, &u)?)?)?;
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

/// The decode tokens of a batch (sequences bringing one new token), attended together: their
/// contexts are gathered into one `[B, kv_heads, max_ctx, head_dim]` tensor, padded positions
/// masked out.
struct DecodeGroup {
    /// Row of each decode token in the flat batch.
    rows: Vec<u32>,
    rows_t: Tensor,
    /// Cache slots `[B * max_ctx]` (padding repeats a valid slot; it is masked).
    slots: Tensor,
    /// Additive mask `[B, 1, 1, max_ctx]`.
    mask: Tensor,
    max_ctx: usize,
    /// Per member: the first visible position (sliding window) and the context length.
    spans: Vec<(usize, usize)>,
    /// The same slots as `slots`, for the CPU kernel.
    slot_list: Vec<u32>,
}

impl DecodeGroup {
    /// `None` when no sequence decodes. A lone decode token goes through the group too, so
    /// its attention is computed the same way alone as beside others.
    fn new(
        model: &Model,
        cache: &PagedKvCache,
        seqs: &[SeqInput<'_>],
        plans: &[(usize, usize, usize, Tensor, Option<Tensor>)],
        device: &Device,
    ) -> Result<Option<Self>> {
        let members: Vec<usize> = (0..plans.len()).filter(|&i| plans[i].2 == 1).collect();
        if members.is_empty() {
            return Ok(None);
        }
        let max_ctx = members.iter().map(|&i| plans[i].1 + 1).max().unwrap_or(1);
        let window = model.config.sliding_window.unwrap_or(usize::MAX);
        let neg = mask_value(model.dtype());
        let mut slots = Vec::with_capacity(members.len() * max_ctx);
        let mut mask = Vec::with_capacity(members.len() * max_ctx);
        let mut spans = Vec::with_capacity(members.len());
        for &i in &members {
            let ctx = plans[i].1 + 1;
            let qpos = ctx - 1;
            spans.push(((qpos + 1).saturating_sub(window), ctx));
            let table = &*seqs[i].table;
            for p in 0..max_ctx {
                let visible = p < ctx && qpos - p.min(qpos) < window;
                slots.push(cache.slot(table, p.min(qpos)) as u32);
                mask.push(if visible { 0.0 } else { neg });
            }
        }
        let rows: Vec<u32> = members.iter().map(|&i| plans[i].0 as u32).collect();
        let b = members.len();
        Ok(Some(Self {
            rows_t: Tensor::new(rows.as_slice(), device)?,
            rows,
            slots: Tensor::new(slots.as_slice(), device)?,
            mask: Tensor::from_vec(mask, (b, 1, 1, max_ctx), device)?.to_dtype(model.dtype())?,
            max_ctx,
            spans,
            slot_list: slots,
        }))
    }

    /// Attention output `[B, heads * head_dim]` of the decode tokens at layer `li`: the CPU
    /// f32 kernel when it applies, else candle ops.
    fn attend(&self, cache: &PagedKvCache, li: usize, q: &Tensor, scale: f64) -> Result<Tensor> {
        if let Some(out) = self.attend_cpu_f32(cache, li, q, scale)? {
            return Ok(out);
        }
        self.attend_tensors(cache, li, q, scale)
    }

    /// Paged attention straight from the cache storage, one task per (sequence, kv head):
    /// reading keys and values through the slots, with no gather and no per-head matmul
    /// calls (hundreds of tiny GEMMs per step otherwise dominate a decode step).
    fn attend_cpu_f32(
        &self,
        cache: &PagedKvCache,
        li: usize,
        q: &Tensor,
        scale: f64,
    ) -> Result<Option<Tensor>> {
        use candle_core::Storage;
        use rayon::prelude::*;
        if q.dtype() != DType::F32 || !q.device().is_cpu() {
            return Ok(None);
        }
        let (_, nh, hd) = q.dims3()?;
        let qd: Vec<f32> = q.index_select(&self.rows_t, 0)?.flatten_all()?.to_vec1()?;
        let (kst, kl) = cache.k[li].storage_and_layout();
        let (vst, vl) = cache.v[li].storage_and_layout();
        let (Storage::Cpu(kc), Storage::Cpu(vc)) = (&*kst, &*vst) else {
            return Ok(None);
        };
        let (Some((k0, _)), Some((v0, _))) = (kl.contiguous_offsets(), vl.contiguous_offsets())
        else {
            return Ok(None);
        };
        let (ks, vs) = (&kc.as_slice::<f32>()?[k0..], &vc.as_slice::<f32>()?[v0..]);
        let nkv = kl.dims()[1];
        let groups = nh / nkv;
        let b = self.spans.len();
        let scale = scale as f32;
        let mut out = vec![0f32; b * nh * hd];
        let arch = pulp::Arch::new();
        out.par_chunks_mut(groups * hd)
            .enumerate()
            .for_each(|(task, o)| {
                let (m, h) = (task / nkv, task % nkv);
                let (first, ctx) = self.spans[m];
                arch.dispatch(AttendHead {
                    slots: &self.slot_list[m * self.max_ctx + first..m * self.max_ctx + ctx],
                    q: &qd[(m * nh + h * groups) * hd..(m * nh + (h + 1) * groups) * hd],
                    kv: KvRows {
                        ks,
                        vs,
                        kv_head: h,
                        nkv,
                        hd,
                    },
                    scale,
                    out: o,
                })
            });
        drop((kst, vst));
        Ok(Some(Tensor::from_vec(out, (b, nh * hd), q.device())?))
    }

    /// Attention output `[B, heads * head_dim]` of the decode tokens at layer `li`, with
    /// candle ops (any dtype or device).
    fn attend_tensors(
        &self,
        cache: &PagedKvCache,
        li: usize,
        q: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        let (_, nh, hd) = q.dims3()?;
        let (b, m) = (self.rows.len(), self.max_ctx);
        let (kc, vc) = cache.gather(li, &self.slots)?; // [B * M, nkv, hd]
        let nkv = kc.dim(1)?;
        let groups = nh / nkv;
        let kc = kc.reshape((b, m, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let vc = vc.reshape((b, m, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let qd = q
            .index_select(&self.rows_t, 0)?
            .reshape((b, nkv, groups, hd))?;
        let scores = (qd.matmul(&kc.transpose(2, 3)?)? * scale)?.broadcast_add(&self.mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(probs.matmul(&vc)?.reshape((b, nh * hd))?)
    }
}

/// One decode token's attention for the query heads sharing one kv head, over its cached
/// slots (f32 CPU cache), with the CPU's widest vectors (`pulp` dispatch): a plain
/// `iter().sum()` dot product is one long dependency chain the compiler may not reorder.
struct AttendHead<'a> {
    slots: &'a [u32],
    /// The group's query heads, `[groups, hd]`.
    q: &'a [f32],
    kv: KvRows<'a>,
    scale: f32,
    /// `[groups, hd]`, zeroed.
    out: &'a mut [f32],
}

/// One kv head's rows in the f32 cache storage (`[slots, nkv, hd]`).
struct KvRows<'a> {
    ks: &'a [f32],
    vs: &'a [f32],
    kv_head: usize,
    nkv: usize,
    hd: usize,
}

impl KvRows<'_> {
    #[inline(always)]
    fn at(&self, slot: u32) -> std::ops::Range<usize> {
        let at = (slot as usize * self.nkv + self.kv_head) * self.hd;
        at..at + self.hd
    }

    /// The key cached in `slot`.
    #[inline(always)]
    fn key(&self, slot: u32) -> &[f32] {
        &self.ks[self.at(slot)]
    }

    /// The value cached in `slot`.
    #[inline(always)]
    fn value(&self, slot: u32) -> &[f32] {
        &self.vs[self.at(slot)]
    }
}

impl pulp::WithSimd for AttendHead<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let hd = self.kv.hd;
        let g = self.q.len() / hd;
        if self.slots.is_empty() {
            return;
        }
        if hd.is_multiple_of(S::F32_LANES) {
            // Head widths and group sizes of the common models: queries, keys, values and
            // the group's outputs in registers.
            match (hd / S::F32_LANES, g) {
                (2, 1) => return self.fixed::<S, 2, 1>(simd),
                (2, 2) => return self.fixed::<S, 2, 2>(simd),
                (2, 3) => return self.fixed::<S, 2, 3>(simd),
                (2, 4) => return self.fixed::<S, 2, 4>(simd),
                (4, 1) => return self.fixed::<S, 4, 1>(simd),
                (4, 2) => return self.fixed::<S, 4, 2>(simd),
                (4, 3) => return self.fixed::<S, 4, 3>(simd),
                (4, 4) => return self.fixed::<S, 4, 4>(simd),
                (8, 1) => return self.fixed::<S, 8, 1>(simd),
                (8, 2) => return self.fixed::<S, 8, 2>(simd),
                _ => {}
            }
        }
        self.any(simd)
    }
}

/// Each row of `scores` (`ctx` wide) turned into its softmax in place, with the vectorised
/// exp of the sampler.
#[inline(always)]
fn softmax_rows(scores: &mut [f32], ctx: usize) {
    for sc in scores.chunks_exact_mut(ctx) {
        let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut lanes = [0f32; 16];
        let mut chunks = sc.chunks_exact_mut(16);
        for c in &mut chunks {
            for (acc, s) in lanes.iter_mut().zip(c) {
                *s = crate::sampling::exp_nonpositive(*s - max);
                *acc += *s;
            }
        }
        let mut total = 0f32;
        for s in chunks.into_remainder() {
            *s = crate::sampling::exp_nonpositive(*s - max);
            total += *s;
        }
        let inv = 1.0 / (lanes.iter().sum::<f32>() + total);
        for s in sc.iter_mut() {
            *s *= inv;
        }
    }
}

impl AttendHead<'_> {
    /// `V` vectors a head, `G` query heads: each cached key and value row is loaded once
    /// into registers for the whole group, the queries and the outputs stay in registers.
    #[inline(always)]
    fn fixed<S: pulp::Simd, const V: usize, const G: usize>(self, simd: S) {
        let AttendHead {
            slots,
            q,
            kv,
            scale,
            out,
        } = self;
        let hd = kv.hd;
        let vecs = |row: &[f32]| -> [S::f32s; V] {
            let (v, _) = S::as_simd_f32s(row);
            std::array::from_fn(|i| v[i])
        };
        let qv: [[S::f32s; V]; G] = std::array::from_fn(|h| vecs(&q[h * hd..(h + 1) * hd]));
        let ctx = slots.len();
        let mut scores = vec![0f32; G * ctx];
        for (j, &slot) in slots.iter().enumerate() {
            let k = vecs(kv.key(slot));
            for h in 0..G {
                let mut acc = simd.mul_f32s(qv[h][0], k[0]);
                for v in 1..V {
                    acc = simd.mul_add_e_f32s(qv[h][v], k[v], acc);
                }
                scores[h * ctx + j] = simd.reduce_sum_f32s(acc) * scale;
            }
        }
        softmax_rows(&mut scores, ctx);
        let mut acc = [[simd.splat_f32s(0.0); V]; G];
        for (j, &slot) in slots.iter().enumerate() {
            let v_row = vecs(kv.value(slot));
            for h in 0..G {
                let w = simd.splat_f32s(scores[h * ctx + j]);
                for v in 0..V {
                    acc[h][v] = simd.mul_add_e_f32s(w, v_row[v], acc[h][v]);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let (o, _) = S::as_mut_simd_f32s(&mut out[h * hd..(h + 1) * hd]);
            o[..V].copy_from_slice(acc);
        }
    }

    /// Any head width and group size.
    #[inline(always)]
    fn any<S: pulp::Simd>(self, simd: S) {
        let AttendHead {
            slots,
            q,
            kv,
            scale,
            out,
        } = self;
        let hd = kv.hd;
        let dot = |a: &[f32], b: &[f32]| {
            let (av, at) = S::as_simd_f32s(a);
            let (bv, bt) = S::as_simd_f32s(b);
            let mut acc = simd.splat_f32s(0.0);
            for (x, y) in av.iter().zip(bv) {
                acc = simd.mul_add_e_f32s(*x, *y, acc);
            }
            simd.reduce_sum_f32s(acc) + at.iter().zip(bt).map(|(x, y)| x * y).sum::<f32>()
        };
        // Each cached key and value row is read once for all the group's query heads.
        let ctx = slots.len();
        let mut scores = vec![0f32; q.len() / hd * ctx];
        for (j, &slot) in slots.iter().enumerate() {
            let k = kv.key(slot);
            for (qv, sc) in q.chunks_exact(hd).zip(scores.chunks_exact_mut(ctx)) {
                sc[j] = dot(qv, k) * scale;
            }
        }
        softmax_rows(&mut scores, ctx);
        for (j, &slot) in slots.iter().enumerate() {
            let (vv, vt) = S::as_simd_f32s(kv.value(slot));
            for (acc, sc) in out.chunks_exact_mut(hd).zip(scores.chunks_exact(ctx)) {
                let w = sc[j];
                let wv = simd.splat_f32s(w);
                let (accv, acct) = S::as_mut_simd_f32s(acc);
                for (a, v) in accv.iter_mut().zip(vv) {
                    *a = simd.mul_add_e_f32s(wv, *v, *a);
                }
                for (a, v) in acct.iter_mut().zip(vt) {
                    *a += w * v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_mul_matches_candle() {
        let dev = Device::Cpu;
        // Large magnitudes of both signs too, where e^x over- or underflows.
        let g = (Tensor::randn(0f32, 1.0, (7, 300), &dev).expect("randn") * 30.0).expect("mul");
        let u = Tensor::randn(0f32, 1.0, (7, 300), &dev).expect("randn");
        let want = (g.silu().expect("silu") * &u).expect("mul");
        let got = silu_mul(&g, &u).expect("silu_mul");
        let err = ((want.clone() - got).expect("sub").abs().expect("abs")
            / (want.abs().expect("abs") + 1e-6).expect("add"))
        .expect("div")
        .max_all()
        .expect("max")
        .to_scalar::<f32>()
        .expect("scalar");
        assert!(err < 1e-5, "relative error {err}");
        // A strided input goes through candle's ops and gives the same.
        let gt = g.t().expect("t");
        let ut = u.t().expect("t");
        let strided = silu_mul(&gt, &ut).expect("strided");
        let plain = (gt.silu().expect("silu") * &ut).expect("mul");
        assert_eq!(
            strided.to_vec2::<f32>().expect("v"),
            plain.to_vec2::<f32>().expect("v")
        );
    }
}
