//! The serving forward: one call over a batch of sequences at different positions, each
//! bringing a prefill chunk of a new prompt or one decode token, with keys and values kept in
//! a [`PagedKvCache`].
//!
//! Tokens of all sequences are flattened into one `[N, hidden]` matrix so every projection
//! and MLP is one matmul for the whole batch; only attention reads each sequence's own
//! blocks. On the CPU in f32 every token attends on its own ([`TokenAttention`], prefill and
//! decode tokens alike) and the rotated keys and values are written straight into the cache
//! ([`WriteRows`]); other dtypes and devices use candle's fused kernels (`rope_thd`,
//! `softmax_last_dim`) per prefill chunk and one padded group for the decode tokens. Fused
//! kernels are used here because no gradient is needed.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::kv_cache::{BlockTable, PagedKvCache};
use crate::model::{Model, mask_value};

/// `silu(g) · u`, the MLP's gate: for f32 CPU tensors whose rows are contiguous (whole
/// tensors, or the first columns of a wider product's rows: AMX products of a width that
/// ends in a partial panel hand back such a view rather than a copy) one parallel pass with
/// the sampler's vectorised exp (candle's `silu` calls libm's `expf` per element, 6% of a
/// prefill), candle ops otherwise.
fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    use candle_core::Storage;
    use rayon::prelude::*;
    let fallback = || -> Result<Tensor> { Ok((g.silu()? * u)?) };
    let Ok((n, width)) = g.dims2() else {
        return fallback();
    };
    if g.dtype() != DType::F32 || u.dtype() != DType::F32 || g.shape() != u.shape() || width == 0 {
        return fallback();
    }
    let (gst, gl) = g.storage_and_layout();
    let (ust, ul) = u.storage_and_layout();
    let (Storage::Cpu(gc), Storage::Cpu(uc)) = (&*gst, &*ust) else {
        return fallback();
    };
    // Each row `width` values at `start + r · stride`.
    let rows = |l: &candle_core::Layout| match l.stride() {
        [stride, 1] if *stride >= width => Some((l.start_offset(), *stride)),
        [_, 1] if n <= 1 => Some((l.start_offset(), width)),
        _ => None,
    };
    let (Some((g0, gstride)), Some((u0, ustride))) = (rows(gl), rows(ul)) else {
        return fallback();
    };
    let (gs, us) = (&gc.as_slice::<f32>()?[g0..], &uc.as_slice::<f32>()?[u0..]);
    let mut out = vec![0f32; n * width];
    // About 4096 values a task, in whole rows.
    let per_task = 4096usize.div_ceil(width);
    out.par_chunks_mut(per_task * width)
        .enumerate()
        .for_each(|(t, out)| {
            for (i, out) in out.chunks_exact_mut(width).enumerate() {
                let r = t * per_task + i;
                pulp::Arch::new().dispatch(SiluMul {
                    out,
                    g: &gs[r * gstride..r * gstride + width],
                    u: &us[r * ustride..r * ustride + width],
                });
            }
        });
    drop((gst, ust));
    Ok(Tensor::from_vec(out, (n, width), g.device())?)
}

/// One chunk of [`silu_mul`] as a `pulp` operation, so its loop is compiled (and vectorised)
/// for the instruction set dispatched to; a closure may stay a baseline SSE2 function.
struct SiluMul<'a> {
    out: &'a mut [f32],
    g: &'a [f32],
    u: &'a [f32],
}

impl pulp::WithSimd for SiluMul<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        for ((o, &x), &u) in self.out.iter_mut().zip(self.g).zip(self.u) {
            // σ(x) from e^-|x| ≤ 1, which never overflows.
            let e = crate::sampling::exp_nonpositive(-x.abs());
            let sigmoid = if x >= 0.0 { 1.0 } else { e } / (1.0 + e);
            *o = x * sigmoid * u;
        }
    }
}

/// `y + x` for a block's output `y` (a fresh tensor the forward owns) and the residual
/// stream `x`: for contiguous f32 CPU tensors added into `y` in place, one parallel pass on
/// this pool (candle's add allocates a new tensor and, from 64k elements, runs on its own
/// worker threads, which then spin on cores the products need); candle's add otherwise.
fn add_residual(y: Tensor, x: &Tensor) -> Result<Tensor> {
    if y.dtype() == DType::F32
        && x.dtype() == DType::F32
        && y.device().is_cpu()
        && y.shape() == x.shape()
        && y.is_contiguous()
        && x.is_contiguous()
    {
        y.inplace_op2(x, &AddInPlace)?;
        return Ok(y);
    }
    Ok((y + x)?)
}

/// The data of an in-place op's contiguous f32 CPU operands: the one written and the one
/// read (`op` names the op in the error otherwise).
fn f32_operands<'a>(
    op: &str,
    dst: &'a mut candle_core::CpuStorage,
    dst_layout: &candle_core::Layout,
    src: &'a candle_core::CpuStorage,
    src_layout: &candle_core::Layout,
) -> candle_core::Result<(&'a mut [f32], &'a [f32])> {
    use candle_core::CpuStorage;
    let (CpuStorage::F32(dst), CpuStorage::F32(src)) = (dst, src) else {
        candle_core::bail!("{op}: f32 tensors only");
    };
    let (Some((d0, d1)), Some((s0, s1))) = (
        dst_layout.contiguous_offsets(),
        src_layout.contiguous_offsets(),
    ) else {
        candle_core::bail!("{op}: contiguous tensors only");
    };
    Ok((&mut dst[d0..d1], &src[s0..s1]))
}

/// `dst += src` for contiguous f32 CPU tensors of one shape ([`add_residual`]).
struct AddInPlace;

impl candle_core::InplaceOp2 for AddInPlace {
    fn name(&self) -> &'static str {
        "add-in-place"
    }

    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dst_layout: &candle_core::Layout,
        src: &candle_core::CpuStorage,
        src_layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (dst, src) = f32_operands(self.name(), dst, dst_layout, src, src_layout)?;
        if dst.len() != src.len() {
            candle_core::bail!("add-in-place: {} and {} values", dst.len(), src.len());
        }
        const CHUNK: usize = 16 * 1024;
        let add = |(d, s): (&mut [f32], &[f32])| {
            for (d, s) in d.iter_mut().zip(s) {
                *d += s;
            }
        };
        if dst.len() <= CHUNK {
            add((dst, src));
        } else {
            dst.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(add);
        }
        Ok(())
    }
}

/// [`Proj::forward_serving_many`] of `N` projections, as an array.
fn serving_products<const N: usize>(
    projs: &[&crate::linear::Proj; N],
    x: &Tensor,
) -> Result<[Tensor; N]> {
    let ys = crate::linear::Proj::forward_serving_many(projs, x)?;
    Ok(ys
        .try_into()
        .expect("forward_serving_many returns one tensor a projection"))
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
        let scale = 1.0 / (hd as f64).sqrt();
        let eps = cfg.rms_norm_eps as f32;
        // Every new token's cache slot: one write per layer covers the whole batch.
        let new_slots: Vec<u32> = seqs
            .iter()
            .flat_map(|s| {
                let start = s.table.len;
                (start..start + s.tokens.len()).map(|p| cache.slot(s.table, p) as u32)
            })
            .collect();
        // Attention of every new token over its own sequence's cached context. On the CPU in
        // f32, rotary embedding and the cache writes are single passes too.
        let (attention, kv_write) = if self.dtype() == DType::F32 && cache.keys_by_block {
            let rows = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
            (
                Attention::Tokens(TokenAttention::new(self, cache, seqs)),
                KvWrite::Rows {
                    cos: rows(&cos)?,
                    sin: rows(&sin)?,
                },
            )
        } else {
            let index = Tensor::new(new_slots.as_slice(), &device)?
                .reshape((n, 1, 1))?
                .broadcast_as((n, nkv, hd))?
                .contiguous()?;
            (
                Attention::Tensors(TensorAttention::new(self, cache, seqs, &device)?),
                KvWrite::Scatter(index),
            )
        };
        let mut x = self
            .embed
            .index_select(&Tensor::new(ids.as_slice(), &device)?, 0)?;
        for (li, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.input_norm, eps)?;
            let [q, k, v] = serving_products(&[&layer.q, &layer.k, &layer.v], &h)?;
            let q = match &kv_write {
                KvWrite::Rows { cos, sin } => {
                    let rope = Rope {
                        cos,
                        sin,
                        head_dim: hd,
                    };
                    let keys = WriteRows {
                        slots: &new_slots,
                        rope: Some(rope),
                        by_block: true,
                    };
                    let values = WriteRows {
                        slots: &new_slots,
                        rope: None,
                        by_block: false,
                    };
                    cache.k[li].inplace_op2(&k.contiguous()?, &keys)?;
                    cache.v[li].inplace_op2(&v.contiguous()?, &values)?;
                    rotate_rows(&q, rope)?.reshape((n, nh, hd))?
                }
                KvWrite::Scatter(index) => {
                    let q = q.reshape((1, n, nh, hd))?.contiguous()?;
                    let k = k.reshape((1, n, nkv, hd))?.contiguous()?;
                    let q = candle_nn::rotary_emb::rope_thd(&q, &cos, &sin)?.squeeze(0)?;
                    let k = candle_nn::rotary_emb::rope_thd(&k, &cos, &sin)?.squeeze(0)?;
                    let v = v.reshape((n, nkv, hd))?;
                    cache.k[li].scatter_set(index, &k.contiguous()?, 0)?;
                    cache.v[li].scatter_set(index, &v.contiguous()?, 0)?;
                    q
                }
            };
            let att = attention.attend(cache, li, &q, scale)?;
            x = add_residual(layer.o.forward_serving(&att)?, &x)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.post_norm, eps)?;
            let [g, u] = serving_products(&[&layer.gate, &layer.up], &h)?;
            x = add_residual(layer.down.forward_serving(&silu_mul(&g, &u)?)?, &x)?;
        }
        let mut last = Vec::with_capacity(seqs.len());
        let mut end = 0;
        for s in seqs.iter() {
            end += s.tokens.len();
            last.push(end as u32 - 1);
        }
        let x = x.index_select(&Tensor::new(last.as_slice(), &device)?, 0)?;
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        let logits = self.lm_head.forward_serving(&x)?.to_dtype(DType::F32)?;
        for s in seqs.iter_mut() {
            s.table.len += s.tokens.len();
        }
        Ok(logits)
    }

    /// Additive mask `[len, start + len]` for a prefill chunk at `start` (causal, and within
    /// a sliding window).
    fn chunk_mask(&self, start: usize, len: usize, device: &Device) -> Result<Tensor> {
        let ctx = start + len;
        let window = self.config.sliding_window.unwrap_or(usize::MAX);
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
        Ok(Tensor::from_vec(m, (len, ctx), device)?.to_dtype(self.dtype())?)
    }
}

/// How a forward rotates keys and queries and writes the new keys and values to the cache.
enum KvWrite {
    /// CPU f32: [`WriteRows`] and [`rotate_rows`] with the tokens' cos/sin rows
    /// (`[n, head_dim / 2]` each).
    Rows { cos: Vec<f32>, sin: Vec<f32> },
    /// Any dtype or device: candle's `rope_thd`, then a scatter at this `[n, kv_heads,
    /// head_dim]` index of the tokens' slots.
    Scatter(Tensor),
}

/// The batch's rotary tables, `[n, head_dim / 2]` each (one row per token, at its position).
#[derive(Clone, Copy)]
struct Rope<'a> {
    cos: &'a [f32],
    sin: &'a [f32],
    head_dim: usize,
}

impl Rope<'_> {
    /// Rotate every `head_dim`-wide head of `src` (token `row`'s) into `dst`: the halves
    /// `[x1·cos − x2·sin, x1·sin + x2·cos]`, as candle's `rope_thd` computes them.
    #[inline]
    fn rotate(&self, row: usize, src: &[f32], dst: &mut [f32]) {
        let half = self.head_dim / 2;
        let (cos, sin) = (
            &self.cos[row * half..(row + 1) * half],
            &self.sin[row * half..(row + 1) * half],
        );
        for (s, d) in src
            .chunks_exact(self.head_dim)
            .zip(dst.chunks_exact_mut(self.head_dim))
        {
            let (x1, x2) = s.split_at(half);
            let (d1, d2) = d.split_at_mut(half);
            for i in 0..half {
                d1[i] = x1[i] * cos[i] - x2[i] * sin[i];
                d2[i] = x1[i] * sin[i] + x2[i] * cos[i];
            }
        }
    }
}

/// `x [n, heads · head_dim]` (f32, CPU) with every head rotated at its token's position.
fn rotate_rows(x: &Tensor, rope: Rope<'_>) -> Result<Tensor> {
    let (n, width) = x.dims2()?;
    let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; xs.len()];
    for (row, (s, d)) in xs
        .chunks_exact(width)
        .zip(out.chunks_exact_mut(width))
        .enumerate()
    {
        rope.rotate(row, s, d);
    }
    Ok(Tensor::from_vec(out, (n, width), x.device())?)
}

/// Writes token `i`'s row of `[n, kv_heads · head_dim]` (f32, CPU) into cache slot `slots[i]`
/// in place, rotating its heads first when `rope` is given: one pass instead of a rotation,
/// copies and a scatter. The cache tensor is `[slots, kv_heads, head_dim]` (values), or with
/// `by_block` `[blocks, kv_heads, head_dim, block_size]` (keys, see
/// [`PagedKvCache::keys_by_block`]).
struct WriteRows<'a> {
    slots: &'a [u32],
    rope: Option<Rope<'a>>,
    by_block: bool,
}

impl candle_core::InplaceOp2 for WriteRows<'_> {
    fn name(&self) -> &'static str {
        "write-kv-rows"
    }

    fn cpu_fwd(
        &self,
        cache: &mut candle_core::CpuStorage,
        cache_layout: &candle_core::Layout,
        rows: &candle_core::CpuStorage,
        rows_layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (dst, src) = f32_operands(self.name(), cache, cache_layout, rows, rows_layout)?;
        let dims = cache_layout.dims();
        // Slots per block (1 for the row layout: a "block" is one slot) and values a slot.
        let (block, width) = if self.by_block {
            (dims[3], dims[1] * dims[2])
        } else {
            (1, dims[1..].iter().product())
        };
        if src.len() != self.slots.len() * width {
            candle_core::bail!(
                "write-kv-rows: {} values for {} slots of {width}",
                src.len(),
                self.slots.len()
            );
        }
        let mut rotated = vec![0f32; if self.rope.is_some() { width } else { 0 }];
        for (row, (&slot, s)) in self.slots.iter().zip(src.chunks_exact(width)).enumerate() {
            let (b, lane) = (slot as usize / block, slot as usize % block);
            let Some(d) = dst.get_mut(b * width * block..(b + 1) * width * block) else {
                candle_core::bail!("write-kv-rows: slot {slot} outside the cache");
            };
            let s = match &self.rope {
                Some(rope) => {
                    rope.rotate(row, s, &mut rotated);
                    &rotated[..]
                }
                None => s,
            };
            if block == 1 {
                d.copy_from_slice(s);
            } else {
                for (i, &x) in s.iter().enumerate() {
                    d[i * block + lane] = x;
                }
            }
        }
        Ok(())
    }
}

/// How a forward attends: the CPU f32 kernel per token, or candle ops (any dtype or device).
enum Attention {
    Tokens(TokenAttention),
    Tensors(TensorAttention),
}

impl Attention {
    /// Attention output `[n, heads * head_dim]` of the batch's tokens at layer `li`, in batch
    /// order, from their rotated queries `[n, heads, head_dim]` (the new keys and values
    /// already in the cache).
    fn attend(&self, cache: &PagedKvCache, li: usize, q: &Tensor, scale: f64) -> Result<Tensor> {
        match self {
            Attention::Tokens(t) => t.attend(cache, li, q, scale),
            Attention::Tensors(t) => t.attend(cache, li, q, scale),
        }
    }
}

/// Paged attention straight from an f32 CPU cache: one task per new token, reading that
/// token's visible keys and values block by block ([`AttendHead`]), with no gather, mask or
/// per-head matmul calls (hundreds of tiny GEMMs and copies per step otherwise dominate both
/// decode steps and short prefill chunks). A prefill chunk's tokens are attended like decode
/// tokens, each over the context up to its own position, so a token's attention is the same
/// computation whether it comes in a prompt or alone, and whatever else is in the batch.
struct TokenAttention {
    /// Each sequence's blocks, one table after another.
    blocks: Vec<u32>,
    /// Per token, in batch order: its sequence's blocks (a range of `blocks`) and its visible
    /// positions (causal, and within a sliding window).
    tokens: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)>,
    block_size: usize,
}

impl TokenAttention {
    /// `seqs`' blocks are reserved for their new tokens; `table.len` is still their start.
    fn new(model: &Model, cache: &PagedKvCache, seqs: &[SeqInput<'_>]) -> Self {
        let window = model.config.sliding_window.unwrap_or(usize::MAX);
        let mut blocks = Vec::with_capacity(seqs.iter().map(|s| s.table.blocks.len()).sum());
        let mut tokens = Vec::with_capacity(seqs.iter().map(|s| s.tokens.len()).sum());
        for s in seqs {
            let base = blocks.len();
            blocks.extend_from_slice(&s.table.blocks);
            let table = base..blocks.len();
            let (start, len) = (s.table.len, s.tokens.len());
            tokens.extend(
                (start..start + len)
                    .map(|qpos| (table.clone(), (qpos + 1).saturating_sub(window)..qpos + 1)),
            );
        }
        Self {
            blocks,
            tokens,
            block_size: cache.block_size,
        }
    }

    fn attend(&self, cache: &PagedKvCache, li: usize, q: &Tensor, scale: f64) -> Result<Tensor> {
        use candle_core::Storage;
        use rayon::prelude::*;
        let (n, nh, hd) = q.dims3()?;
        let (qst, ql) = q.storage_and_layout();
        let (kst, kl) = cache.k[li].storage_and_layout();
        let (vst, vl) = cache.v[li].storage_and_layout();
        let (Storage::Cpu(qc), Storage::Cpu(kc), Storage::Cpu(vc)) = (&*qst, &*kst, &*vst) else {
            return Err(ModelError::KvCache(
                "the token attention kernel needs CPU storage".into(),
            ));
        };
        let (Some((q0, q1)), Some((k0, _)), Some((v0, _))) = (
            ql.contiguous_offsets(),
            kl.contiguous_offsets(),
            vl.contiguous_offsets(),
        ) else {
            return Err(ModelError::KvCache(
                "the token attention kernel needs contiguous queries and cache".into(),
            ));
        };
        let qs = &qc.as_slice::<f32>()?[q0..q1];
        let (ks, vs) = (&kc.as_slice::<f32>()?[k0..], &vc.as_slice::<f32>()?[v0..]);
        let nkv = vl.dims()[1];
        let groups = nh / nkv;
        let scale = scale as f32;
        let mut out = vec![0f32; n * nh * hd];
        let arch = pulp::Arch::new();
        // A few tasks a thread, each a run of tokens (all their kv heads): a decode step's
        // tokens are each only a few microseconds. While a token attends, the next one's keys
        // and values are fetched into L2: a sequence's blocks lie anywhere in the cache, so
        // the hardware prefetchers stop at every block, and a decode step reads the whole
        // context of every sequence from memory.
        let per_task = n.div_ceil(4 * rayon::current_num_threads()).max(1);
        let kv = |h: usize| KvBlocks {
            ks,
            vs,
            kv_head: h,
            nkv,
            hd,
            block: self.block_size,
        };
        out.par_chunks_mut(per_task * nh * hd)
            .enumerate()
            .flat_map_iter(|(t, o)| {
                o.chunks_exact_mut(nh * hd)
                    .enumerate()
                    .map(move |(i, o)| (t * per_task + i, o))
            })
            .for_each(|(row, o)| {
                if let Some((table, visible)) = self.tokens.get(row + 1) {
                    self.prefetch(&kv(0), &self.blocks[table.clone()], visible.clone());
                }
                let (table, visible) = &self.tokens[row];
                for (h, o) in o.chunks_exact_mut(groups * hd).enumerate() {
                    let heads = row * nh + h * groups;
                    arch.dispatch(AttendHead {
                        blocks: &self.blocks[table.clone()],
                        visible: visible.clone(),
                        q: &qs[heads * hd..(heads + groups) * hd],
                        kv: kv(h),
                        scale,
                        out: o,
                    })
                }
            });
        drop((qst, kst, vst));
        Ok(Tensor::from_vec(out, (n, nh * hd), q.device())?)
    }

    /// Ask for the keys and values of every kv head that a token seeing `visible` of the
    /// sequence's `blocks` reads, into L2, without waiting for them (`kv` is head 0's).
    fn prefetch(&self, kv: &KvBlocks<'_>, blocks: &[u32], visible: std::ops::Range<usize>) {
        if visible.is_empty() {
            return;
        }
        let bs = self.block_size;
        let heads = kv.nkv * kv.hd;
        for b in &blocks[visible.start / bs..=(visible.end - 1) / bs] {
            // A block's keys of all kv heads are contiguous.
            let at = *b as usize * heads * bs;
            crate::packed::prefetch_l2(kv.ks.get(at..at + heads * bs));
        }
        for p in visible {
            let at = slot_of(blocks, bs, p) * heads;
            crate::packed::prefetch_l2(kv.vs.get(at..at + heads));
        }
    }
}

/// The cache slot of position `p` of a sequence with `blocks` of `block_size` slots.
#[inline(always)]
fn slot_of(blocks: &[u32], block_size: usize, p: usize) -> usize {
    blocks[p / block_size] as usize * block_size + p % block_size
}

/// Attention with candle ops, for any dtype or device: decode tokens (sequences bringing one
/// new token) share one batched attention over their contexts padded to the longest
/// ([`DecodeGroup`]); each prefill chunk attends on its own with an additive mask.
struct TensorAttention {
    /// Per prefill chunk: offset into the flat batch, start position, length, the slots of
    /// its whole context and its mask.
    chunks: Vec<(usize, usize, usize, Tensor, Tensor)>,
    decode: Option<DecodeGroup>,
    /// The inverse permutation from the pieces' order (chunks, then the decode group) back to
    /// batch order; `None` when they agree.
    unpermute: Option<Tensor>,
}

impl TensorAttention {
    fn new(
        model: &Model,
        cache: &PagedKvCache,
        seqs: &[SeqInput<'_>],
        device: &Device,
    ) -> Result<Self> {
        let mut offsets = Vec::with_capacity(seqs.len());
        let mut offset = 0;
        for s in seqs {
            offsets.push(offset);
            offset += s.tokens.len();
        }
        let decode = DecodeGroup::new(model, cache, seqs, &offsets, device)?;
        let mut chunks = Vec::new();
        for (s, &off) in seqs.iter().zip(&offsets) {
            let (start, len) = (s.table.len, s.tokens.len());
            if len == 1 {
                continue; // in the decode group
            }
            let slots: Vec<u32> = (0..start + len)
                .map(|p| cache.slot(s.table, p) as u32)
                .collect();
            chunks.push((
                off,
                start,
                len,
                Tensor::new(slots.as_slice(), device)?,
                model.chunk_mask(start, len, device)?,
            ));
        }
        let mut piece_rows: Vec<u32> = Vec::with_capacity(offset);
        for (off, _, len, _, _) in &chunks {
            piece_rows.extend((*off..off + len).map(|r| r as u32));
        }
        if let Some(d) = &decode {
            piece_rows.extend(d.rows.iter().copied());
        }
        let unpermute = if piece_rows.iter().enumerate().all(|(i, &r)| i as u32 == r) {
            None
        } else {
            let mut inv = vec![0u32; offset];
            for (pos, &row) in piece_rows.iter().enumerate() {
                inv[row as usize] = pos as u32;
            }
            Some(Tensor::new(inv.as_slice(), device)?)
        };
        Ok(Self {
            chunks,
            decode,
            unpermute,
        })
    }

    fn attend(&self, cache: &PagedKvCache, li: usize, q: &Tensor, scale: f64) -> Result<Tensor> {
        let (_, nh, hd) = q.dims3()?;
        let mut outs = Vec::with_capacity(self.chunks.len() + 1);
        for (off, start, len, slots, mask) in &self.chunks {
            let (kc, vc) = cache.gather(li, slots)?;
            let nkv = kc.dim(1)?;
            let groups = nh / nkv;
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
            let scores = (qs.matmul(&kc.t()?)? * scale)?
                .reshape((nkv, groups, *len, ctx))?
                .broadcast_add(mask)?
                .reshape((nkv, groups * len, ctx))?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let att = probs
                .matmul(&vc)?
                .reshape((nh, *len, hd))?
                .transpose(0, 1)?
                .reshape((*len, nh * hd))?;
            outs.push(att);
        }
        if let Some(d) = &self.decode {
            outs.push(d.attend(cache, li, q, scale)?);
        }
        let att = if outs.len() == 1 {
            outs.pop().expect("one piece")
        } else {
            Tensor::cat(&outs, 0)?
        };
        Ok(match &self.unpermute {
            Some(inv) => att.index_select(inv, 0)?,
            None => att,
        })
    }
}

/// The decode tokens of a batch (sequences bringing one new token), attended together with
/// candle ops: their contexts are gathered into one `[B, kv_heads, max_ctx, head_dim]`
/// tensor, padded positions masked out.
struct DecodeGroup {
    /// Row of each decode token in the flat batch.
    rows: Vec<u32>,
    rows_t: Tensor,
    /// Cache slots `[B * max_ctx]` (padding repeats a valid slot; it is masked).
    slots: Tensor,
    /// Additive mask `[B, 1, 1, max_ctx]`.
    mask: Tensor,
    max_ctx: usize,
}

impl DecodeGroup {
    /// `None` when no sequence decodes. A lone decode token goes through the group too, so
    /// its attention is computed the same way alone as beside others. `offsets` are the
    /// sequences' first rows in the flat batch.
    fn new(
        model: &Model,
        cache: &PagedKvCache,
        seqs: &[SeqInput<'_>],
        offsets: &[usize],
        device: &Device,
    ) -> Result<Option<Self>> {
        let members: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].tokens.len() == 1)
            .collect();
        if members.is_empty() {
            return Ok(None);
        }
        let max_ctx = members
            .iter()
            .map(|&i| seqs[i].table.len + 1)
            .max()
            .unwrap_or(1);
        let window = model.config.sliding_window.unwrap_or(usize::MAX);
        let neg = mask_value(model.dtype());
        let mut slots = Vec::with_capacity(members.len() * max_ctx);
        let mut mask = Vec::with_capacity(members.len() * max_ctx);
        for &i in &members {
            let qpos = seqs[i].table.len;
            let ctx = qpos + 1;
            let table = &*seqs[i].table;
            for p in 0..max_ctx {
                let visible = p < ctx && qpos - p.min(qpos) < window;
                slots.push(cache.slot(table, p.min(qpos)) as u32);
                mask.push(if visible { 0.0 } else { neg });
            }
        }
        let rows: Vec<u32> = members.iter().map(|&i| offsets[i] as u32).collect();
        let b = members.len();
        Ok(Some(Self {
            rows_t: Tensor::new(rows.as_slice(), device)?,
            rows,
            slots: Tensor::new(slots.as_slice(), device)?,
            mask: Tensor::from_vec(mask, (b, 1, 1, max_ctx), device)?.to_dtype(model.dtype())?,
            max_ctx,
        }))
    }

    /// Attention output `[B, heads * head_dim]` of the decode tokens at layer `li`.
    fn attend(&self, cache: &PagedKvCache, li: usize, q: &Tensor, scale: f64) -> Result<Tensor> {
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

/// One token's attention for the query heads sharing one kv head, over its visible cached
/// positions (f32 CPU cache), with the CPU's widest vectors (`pulp` dispatch).
struct AttendHead<'a> {
    /// The sequence's blocks, in position order.
    blocks: &'a [u32],
    /// The positions this token sees.
    visible: std::ops::Range<usize>,
    /// The group's query heads, `[groups, hd]`.
    q: &'a [f32],
    kv: KvBlocks<'a>,
    scale: f32,
    /// `[groups, hd]`, zeroed.
    out: &'a mut [f32],
}

/// One kv head's keys (`[blocks, nkv, hd, block]`, see [`PagedKvCache::keys_by_block`]) and
/// values (`[slots, nkv, hd]`) in the f32 cache storage.
struct KvBlocks<'a> {
    ks: &'a [f32],
    vs: &'a [f32],
    kv_head: usize,
    nkv: usize,
    hd: usize,
    block: usize,
}

impl KvBlocks<'_> {
    /// Block `b`'s keys of this head, `[hd, block]`: row `d` holds dimension `d` of every
    /// position in the block.
    #[inline(always)]
    fn keys(&self, b: u32) -> &[f32] {
        let at = (b as usize * self.nkv + self.kv_head) * self.hd * self.block;
        &self.ks[at..at + self.hd * self.block]
    }

    /// The value cached in `slot`.
    #[inline(always)]
    fn value(&self, slot: usize) -> &[f32] {
        let at = (slot * self.nkv + self.kv_head) * self.hd;
        &self.vs[at..at + self.hd]
    }
}

impl pulp::WithSimd for AttendHead<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let hd = self.kv.hd;
        let g = self.q.len() / hd;
        if self.visible.is_empty() {
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

/// `sc` turned into its softmax in place, with the vectorised exp of the sampler.
#[inline(always)]
fn softmax(sc: &mut [f32]) {
    let max = crate::sampling::max_of(sc);
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

impl AttendHead<'_> {
    /// The blocks holding the visible positions, the first position of the first of them,
    /// and how many positions those blocks span.
    fn span(&self) -> (&[u32], usize, usize) {
        let bs = self.kv.block;
        let (b0, b1) = (self.visible.start / bs, (self.visible.end - 1) / bs);
        (&self.blocks[b0..=b1], b0 * bs, (b1 + 1 - b0) * bs)
    }

    /// `[groups, span]` scaled scores of every position of the visible blocks (`G` query
    /// heads): each dimension of a block's keys is one row of the block, so with blocks of
    /// whole vectors a block's scores are `hd` broadcast FMAs a head and vector, with no
    /// horizontal sums; other block sizes take plain loops.
    #[inline(always)]
    fn scores<S: pulp::Simd, const G: usize>(&self, simd: S) -> Vec<f32> {
        let (blocks, _, span) = self.span();
        let (hd, bs) = (self.kv.hd, self.kv.block);
        let mut scores = vec![0f32; G * span];
        let lanes = S::F32_LANES;
        if bs.is_multiple_of(lanes) {
            // Every vector of positions (a block's `bs / lanes`, block after block), up to
            // four at a time: each sum is still over `d` in order, but four vectors give the
            // FMA units 4·G independent chains instead of G.
            let vectors = span / lanes;
            let quads = vectors / 4 * 4;
            for v0 in (0..quads).step_by(4) {
                self.score_vectors::<S, G, 4>(simd, blocks, v0, span, &mut scores);
            }
            for v0 in quads..vectors {
                self.score_vectors::<S, G, 1>(simd, blocks, v0, span, &mut scores);
            }
        } else {
            for (bi, &b) in blocks.iter().enumerate() {
                let keys = self.kv.keys(b);
                for h in 0..G {
                    let sc = &mut scores[h * span + bi * bs..h * span + (bi + 1) * bs];
                    for (d, row) in keys.chunks_exact(bs).enumerate() {
                        let qd = self.q[h * hd + d];
                        for (s, &k) in sc.iter_mut().zip(row) {
                            *s += qd * k;
                        }
                    }
                    for s in sc.iter_mut() {
                        *s *= self.scale;
                    }
                }
            }
        }
        scores
    }

    /// Scaled scores of the `U` vectors of positions from the `v0`-th of the visible blocks
    /// (`lanes` positions each, block after block) for the group's `G` query heads, written
    /// to `scores` (`[G, span]`): each dimension of a block's keys is one row of the block,
    /// so a vector's scores are `hd` broadcast FMAs a head, with no horizontal sums.
    #[inline(always)]
    fn score_vectors<S: pulp::Simd, const G: usize, const U: usize>(
        &self,
        simd: S,
        blocks: &[u32],
        v0: usize,
        span: usize,
        scores: &mut [f32],
    ) {
        let (hd, bs, lanes) = (self.kv.hd, self.kv.block, S::F32_LANES);
        // (first score of the vector in a head's `span`, its keys' offset in the block)
        let at: [(usize, usize); U] =
            std::array::from_fn(|u| ((v0 + u) * lanes, (v0 + u) * lanes % bs));
        let keys: [&[f32]; U] = std::array::from_fn(|u| self.kv.keys(blocks[at[u].0 / bs]));
        // `acc[h][u]`: head `h`'s scores of vector `u`.
        let mut acc = [[simd.splat_f32s(0.0); U]; G];
        for d in 0..hd {
            let k: [S::f32s; U] = std::array::from_fn(|u| {
                let from = d * bs + at[u].1;
                S::as_simd_f32s(&keys[u][from..from + lanes]).0[0]
            });
            for (h, acc) in acc.iter_mut().enumerate() {
                let qd = simd.splat_f32s(self.q[h * hd + d]);
                for (acc, k) in acc.iter_mut().zip(k) {
                    *acc = simd.mul_add_e_f32s(qd, k, *acc);
                }
            }
        }
        let scale = simd.splat_f32s(self.scale);
        for (h, acc) in acc.iter().enumerate() {
            for (acc, &(first, _)) in acc.iter().zip(&at) {
                let to = h * span + first;
                S::as_mut_simd_f32s(&mut scores[to..to + lanes]).0[0] = simd.mul_f32s(*acc, scale);
            }
        }
    }

    /// The slot of visible position `p`.
    #[inline(always)]
    fn slot(&self, p: usize) -> usize {
        slot_of(self.blocks, self.kv.block, p)
    }

    /// `V` vectors a head, `G` query heads: each cached value row is loaded once into
    /// registers for the whole group, the outputs stay in registers.
    #[inline(always)]
    fn fixed<S: pulp::Simd, const V: usize, const G: usize>(self, simd: S) {
        let hd = self.kv.hd;
        let (_, first, span) = self.span();
        let mut scores = self.scores::<S, G>(simd);
        let (lo, hi) = (self.visible.start - first, self.visible.end - first);
        for sc in scores.chunks_exact_mut(span) {
            softmax(&mut sc[lo..hi]);
        }
        let mut acc = [[simd.splat_f32s(0.0); V]; G];
        for p in self.visible.clone() {
            let (v_row, _) = S::as_simd_f32s(self.kv.value(self.slot(p)));
            for h in 0..G {
                let w = simd.splat_f32s(scores[h * span + p - first]);
                for v in 0..V {
                    acc[h][v] = simd.mul_add_e_f32s(w, v_row[v], acc[h][v]);
                }
            }
        }
        for (h, acc) in acc.iter().enumerate() {
            let (o, _) = S::as_mut_simd_f32s(&mut self.out[h * hd..(h + 1) * hd]);
            o[..V].copy_from_slice(acc);
        }
    }

    /// Any head width and group size.
    #[inline(always)]
    fn any<S: pulp::Simd>(self, simd: S) {
        let hd = self.kv.hd;
        let groups = self.q.len() / hd;
        let (blocks, first, span) = self.span();
        let bs = self.kv.block;
        // Scores with plain loops over each block's rows (see `scores`).
        let mut scores = vec![0f32; groups * span];
        for (bi, &b) in blocks.iter().enumerate() {
            let keys = self.kv.keys(b);
            for (h, q) in self.q.chunks_exact(hd).enumerate() {
                let sc = &mut scores[h * span + bi * bs..h * span + (bi + 1) * bs];
                for (row, &qd) in keys.chunks_exact(bs).zip(q) {
                    for (s, &k) in sc.iter_mut().zip(row) {
                        *s += qd * k;
                    }
                }
            }
        }
        let (lo, hi) = (self.visible.start - first, self.visible.end - first);
        for sc in scores.chunks_exact_mut(span) {
            for s in &mut sc[lo..hi] {
                *s *= self.scale;
            }
            softmax(&mut sc[lo..hi]);
        }
        for p in self.visible.clone() {
            let (vv, vt) = S::as_simd_f32s(self.kv.value(self.slot(p)));
            for (acc, sc) in self.out.chunks_exact_mut(hd).zip(scores.chunks_exact(span)) {
                let w = sc[p - first];
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
        // The first columns of wider rows (a padded product's view) are read in place, each
        // row from its own offset, and give what the contiguous copies give.
        let (gv, uv) = (
            g.narrow(1, 0, 290).expect("g"),
            u.narrow(1, 3, 290).expect("u"),
        );
        assert!(!gv.is_contiguous() && !uv.is_contiguous());
        let viewed = silu_mul(&gv, &uv).expect("views");
        let copied =
            silu_mul(&gv.contiguous().expect("g"), &uv.contiguous().expect("u")).expect("copies");
        assert_eq!(viewed.dims(), [7, 290]);
        assert_eq!(
            viewed.to_vec2::<f32>().expect("v"),
            copied.to_vec2::<f32>().expect("v")
        );
    }
}
