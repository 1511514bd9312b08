//! A hand-written forward and backward of the llama body, for full fine-tuning on the CPU in
//! f32 (or f64): [`loss_and_grads`] returns the loss and the gradient of every weight without
//! candle's autograd.
//!
//! candle's backward allocates a zeroed tensor for every gradient it meets and adds into it
//! (`GradStore::or_insert` + `add`), and the composed forward records a node per small op:
//! on the `small` shape at 8 × 256 tokens that bookkeeping, not the products, was most of a
//! training step (perf: 46% gemm; zeroing, copying and gradient sums most of the rest). Here
//! each layer keeps the few activations its backward reads (normalised inputs, rotated
//! q/k, v, attention probabilities, the MLP's gate and up outputs), the products run on
//! `gemm` straight from and into those buffers (weight gradients `dyᵀ · x` read `dy`
//! transposed in place), attention runs per (sequence, head) on row-strided views of the
//! projections without transposes, skipping the causal upper triangle in 64-query blocks,
//! and the element-wise steps (RMS norm, rotary, softmax,
//! SiLU gate) are single passes with their backward written out:
//! - RMS norm `y = x · r · w`, `r = 1 / √(mean x² + ε)`: `dw = Σ dy ⊙ x · r`,
//!   `dx = r · dn − x · r³ · Σⱼ(dn ⊙ x) / H` with `dn = dy ⊙ w`;
//! - rotary: the inverse rotation (`sin → −sin`);
//! - softmax: `ds = p ⊙ (dp − Σⱼ dp ⊙ p)`;
//! - `a = silu(g) · u`: `du = da · silu(g)`, `dg = da · u · σ(g) · (1 + g · (1 − σ(g)))`.
//!
//! The LM head and the loss ([`head_loss`]) multiply out only the positions whose target
//! counts, a vocabulary chunk at a time, with one `exp` per logit.
//!
//! The results equal the autograd path's (`Model::forward_train` + `causal_lm_loss`) up to
//! summation order, masks included: causal, sliding window, key padding (a query that sees no
//! key attends uniformly, as the additive `-1e9` mask makes it), and seeded dropout drawn in
//! the same order from the same generator. Sums over rows (norm weights, biases) run in
//! fixed chunks, so a step is bit-for-bit repeatable. LoRA adapters, q8_0 or released
//! weights, other devices and half precision train through autograd ([`supported`]).

use std::borrow::Cow;
use std::collections::HashMap;

use candle_core::{DType, Device, Storage, StorageRef, Tensor, TensorId, WithDType};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::linear::{Proj, dropout_mask};
use crate::loss;
use crate::model::{Layer, Model};
use crate::rng::Rng;

/// The element types this path computes in.
pub(crate) trait Real: WithDType {
    fn exp(self) -> Self;
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    fn exp(self) -> Self {
        f32::exp(self)
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    fn exp(self) -> Self {
        f64::exp(self)
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// Whether `model` trains on this path: CPU f32/f64 weights, all of the model's dtype,
/// present and contiguous; no LoRA adapters, q8_0 weights or LM-head bias.
pub fn supported(model: &Model) -> bool {
    let dtype = model.dtype();
    let fits = |t: &Tensor| t.dtype() == dtype && t.is_contiguous();
    let plain = |p: &Proj| {
        p.lora.is_none()
            && p.quantized.is_none()
            && p.weight.dims().first().is_some_and(|&d| d > 0)
            && fits(&p.weight)
            && p.bias.as_ref().is_none_or(fits)
    };
    matches!(model.device(), Device::Cpu)
        && matches!(dtype, DType::F32 | DType::F64)
        && [&model.embed, &model.norm, &model.cos, &model.sin]
            .into_iter()
            .all(fits)
        && model.lm_head.bias.is_none()
        && plain(&model.lm_head)
        && model.layers.iter().all(|l| {
            fits(&l.input_norm)
                && fits(&l.post_norm)
                && [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .into_iter()
                    .all(plain)
        })
}

/// Loss and weight gradients of one micro-batch, keyed by the id of the model's tensor
/// (a tied embedding gets the sum of both uses).
pub struct Gradients {
    /// Summed masked negative log-likelihood over `normalizer`.
    pub loss: f64,
    pub grads: HashMap<TensorId, Tensor>,
}

/// The training loss of `input_ids` (`[b, t]`) and every weight's gradient, as
/// `loss::lm_head_loss` over `Model::forward_train_hidden` would give them. `dropout` carries
/// the probability and the generator the masks come from. The model must be
/// [`supported`].
pub fn loss_and_grads(
    model: &Model,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    label_mask: &Tensor,
    normalizer: Option<f64>,
    dropout: Option<(f32, &mut Rng)>,
) -> Result<Gradients> {
    if !supported(model) {
        return Err(ModelError::input(
            "model",
            "the hand-written backward needs CPU f32/f64 weights without adapters",
        ));
    }
    let batch = BatchInfo::new(model, input_ids, attention_mask)?;
    match model.dtype() {
        DType::F32 => run::<f32>(model, &batch, input_ids, label_mask, normalizer, dropout),
        _ => run::<f64>(model, &batch, input_ids, label_mask, normalizer, dropout),
    }
}

/// The token ids and which keys are real tokens, checked.
struct BatchInfo {
    b: usize,
    t: usize,
    ids: Vec<u32>,
    /// `[b, t]`: whether the key is a token (not padding).
    keys: Vec<bool>,
}

impl BatchInfo {
    fn new(model: &Model, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Self> {
        let (b, t) = input_ids.dims2()?;
        if t > model.config.max_position_embeddings {
            return Err(ModelError::input(
                "input_ids",
                format!("{t} positions exceed max_position_embeddings"),
            ));
        }
        if attention_mask.dims() != [b, t] {
            return Err(ModelError::input(
                "attention_mask",
                format!("shape {:?}, expected [{b}, {t}]", attention_mask.dims()),
            ));
        }
        let ids = input_ids
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let vocab = model.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            return Err(ModelError::input(
                "input_ids",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        let keys = attention_mask
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|m| m != 0.0)
            .collect();
        Ok(Self { b, t, ids, keys })
    }
}

/// A CPU tensor's data, borrowed for the step.
struct View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> View<'a> {
    fn of(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| ModelError::input("model", "weights must be contiguous"))?;
        Ok(Self {
            guard,
            start,
            len: end - start,
        })
    }

    fn slice<T: WithDType>(&self) -> &[T] {
        match &*self.guard {
            Storage::Cpu(c) => &c.as_slice::<T>().expect("dtype checked by supported")
                [self.start..self.start + self.len],
            _ => unreachable!("device checked by supported"),
        }
    }
}

/// A strided matrix view: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

/// Row-major `[_, cols]`.
fn rows_of<T>(data: &[T], cols: usize) -> Mat<'_, T> {
    Mat {
        data,
        rs: cols,
        cs: 1,
    }
}

/// Row-major rows of stride `rs` starting at `data[off]`.
fn at<T>(data: &[T], off: usize, rs: usize) -> Mat<'_, T> {
    Mat {
        data: &data[off..],
        rs,
        cs: 1,
    }
}

impl<T> Mat<'_, T> {
    fn t(self) -> Self {
        Self {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// `dst[m, n]` (row stride `dst_rs`) `= scale · a[m, k] · b[k, n]`, or `+=` when
/// `accumulate`. `threads`: run on the rayon pool, else on this thread.
#[allow(clippy::too_many_arguments)]
fn gemm<T: Real>(
    dst: &mut [T],
    dst_rs: usize,
    dims: (usize, usize, usize),
    a: Mat<'_, T>,
    b: Mat<'_, T>,
    scale: T,
    accumulate: bool,
    threads: bool,
) {
    let len = dst.len();
    gemm_raw(
        dst.as_mut_ptr(),
        len,
        dst_rs,
        dims,
        (a, b),
        scale,
        accumulate,
        threads,
    );
}

/// `a[m, k] · b[k, n]` into a new `[m, n]` buffer, written once (never zeroed first).
fn product<T: Real>(dims: (usize, usize, usize), a: Mat<'_, T>, b: Mat<'_, T>) -> Vec<T> {
    let (m, n, _) = dims;
    let mut out: Vec<T> = Vec::with_capacity(m * n);
    let spare = out.spare_capacity_mut();
    let len = spare.len();
    gemm_raw(
        spare.as_mut_ptr().cast::<T>(),
        len,
        n,
        dims,
        (a, b),
        T::one(),
        false,
        true,
    );
    set_written_len(&mut out, m * n);
    out
}

/// `out.set_len(len)` after [`gemm_raw`] wrote its first `len` elements.
#[allow(unsafe_code)]
fn set_written_len<T>(out: &mut Vec<T>, len: usize) {
    assert!(len <= out.capacity());
    // SAFETY: the caller's `gemm_raw` (without `accumulate`) wrote every element of the
    // `[m, n]` block with row stride `n`, i.e. the first `len = m·n` elements.
    unsafe { out.set_len(len) };
}

/// [`gemm`] on a raw destination of `dst_len` elements (possibly not yet initialised when
/// `accumulate` is false: every element of the `[m, n]` block is written, zeros when `k` is
/// 0).
#[allow(unsafe_code)]
#[allow(clippy::too_many_arguments)]
fn gemm_raw<T: Real>(
    dst: *mut T,
    dst_len: usize,
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    (a, b): (Mat<'_, T>, Mat<'_, T>),
    scale: T,
    accumulate: bool,
    threads: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rs: usize, cs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    assert!(last(dst_rs, 1, m, n) < dst_len, "gemm: dst too small");
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    // SAFETY: `i·dst_rs + j ≤ last(...) < dst_len`, asserted above.
                    unsafe { dst.add(i * dst_rs + j).write(T::zero()) };
                }
            }
        }
        return;
    }
    assert!(last(a.rs, a.cs, m, k) < a.data.len(), "gemm: lhs too small");
    assert!(last(b.rs, b.cs, k, n) < b.data.len(), "gemm: rhs too small");
    let parallelism = if threads {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: every index gemm touches, `(i, j) ↦ i·rs + j·cs` over the checked extents,
    // lies inside the buffers asserted above; `dst` comes from a mutable borrow, so no other
    // view aliases it, and without `accumulate` gemm only writes it.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Rows per task of the element-wise passes and fixed-chunk row sums.
const ROW_CHUNK: usize = 64;

/// `Σ_rows f(row_index, row)` into a `width` vector, in fixed chunks summed in order (so the
/// result does not depend on scheduling).
fn row_sums<T: Real>(n: usize, width: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) -> Vec<T> {
    let partials: Vec<Vec<T>> = (0..n.div_ceil(ROW_CHUNK))
        .into_par_iter()
        .map(|c| {
            let mut acc = vec![T::zero(); width];
            for i in c * ROW_CHUNK..((c + 1) * ROW_CHUNK).min(n) {
                f(i, &mut acc);
            }
            acc
        })
        .collect();
    let mut total = vec![T::zero(); width];
    for p in partials {
        for (t, v) in total.iter_mut().zip(p) {
            *t += v;
        }
    }
    total
}

/// `x [n, in] · wᵀ (+ bias)` → `[n, out]`.
fn linear<T: Real>(x: &[T], w: &[T], bias: Option<&[T]>, n: usize, inn: usize) -> Vec<T> {
    let out = w.len() / inn;
    let mut y = product((n, out, inn), rows_of(x, inn), rows_of(w, inn).t());
    if let Some(b) = bias {
        y.par_chunks_mut(out * ROW_CHUNK).for_each(|c| {
            for row in c.chunks_exact_mut(out) {
                for (v, &b) in row.iter_mut().zip(b) {
                    *v += b;
                }
            }
        });
    }
    y
}

/// The gradients of `y = x · wᵀ (+ b)` for `dy [n, out]`: `dw = dyᵀ · x`, `db = Σ dy`.
fn linear_weight_grads<T: Real>(
    dy: &[T],
    x: &[T],
    n: usize,
    inn: usize,
    with_bias: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let out = dy.len() / n;
    let dw = product((out, inn, n), rows_of(dy, out).t(), rows_of(x, inn));
    let db = with_bias.then(|| {
        row_sums(n, out, |i, acc: &mut [T]| {
            for (a, &v) in acc.iter_mut().zip(&dy[i * out..(i + 1) * out]) {
                *a += v;
            }
        })
    });
    (dw, db)
}

/// `dy [n, out] · w [out, in]`.
fn linear_input_grad<T: Real>(dy: &[T], w: &[T], n: usize) -> Vec<T> {
    let out = dy.len() / n;
    let inn = w.len() / out;
    product((n, inn, out), rows_of(dy, out), rows_of(w, inn))
}

/// `dx += dy [n, out] · w [out, in]`.
fn add_linear_input_grad<T: Real>(dx: &mut [T], dy: &[T], w: &[T], n: usize) {
    let inn = dx.len() / n;
    let out = w.len() / inn;
    gemm(
        dx,
        inn,
        (n, inn, out),
        rows_of(dy, out),
        rows_of(w, inn),
        T::one(),
        true,
        true,
    );
}

/// RMS norm of each `h`-wide row: `(x · r ⊙ w, r)`, `r = 1 / √(mean x² + ε)`.
fn rms_forward<T: Real>(x: &[T], w: &[T], eps: f64) -> (Vec<T>, Vec<T>) {
    let h = w.len();
    let n = x.len() / h;
    let mut y = vec![T::zero(); x.len()];
    let mut r = vec![T::zero(); n];
    let eps = T::from_f64(eps);
    let hn = T::from_f64(h as f64);
    y.par_chunks_mut(h * ROW_CHUNK)
        .zip(r.par_chunks_mut(ROW_CHUNK))
        .zip(x.par_chunks(h * ROW_CHUNK))
        .for_each(|((y, r), x)| {
            for ((y, r), x) in y.chunks_exact_mut(h).zip(r).zip(x.chunks_exact(h)) {
                let mut ss = T::zero();
                for &v in x {
                    ss += v * v;
                }
                *r = T::one() / (ss / hn + eps).sqrt();
                for ((y, &v), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = v * *r * w;
                }
            }
        });
    (y, r)
}

/// Backward of [`rms_forward`]: `dx += ∂/∂x` (into the residual gradient), returns `dw`.
fn rms_backward<T: Real>(dx: &mut [T], dy: &[T], x: &[T], r: &[T], w: &[T]) -> Vec<T> {
    let h = w.len();
    let n = r.len();
    let hn = T::from_f64(h as f64);
    let dw = row_sums(n, h, |i, acc: &mut [T]| {
        let (dy, x) = (&dy[i * h..(i + 1) * h], &x[i * h..(i + 1) * h]);
        for ((a, &g), &v) in acc.iter_mut().zip(dy).zip(x) {
            *a += g * v * r[i];
        }
    });
    dx.par_chunks_mut(h * ROW_CHUNK)
        .enumerate()
        .for_each(|(c, dx)| {
            for (j, dx) in dx.chunks_exact_mut(h).enumerate() {
                let i = c * ROW_CHUNK + j;
                let (dy, x, r) = (&dy[i * h..(i + 1) * h], &x[i * h..(i + 1) * h], r[i]);
                let mut dot = T::zero();
                for ((&g, &w), &v) in dy.iter().zip(w).zip(x) {
                    dot += g * w * v;
                }
                let k = r * r * r * dot / hn;
                for (((d, &g), &w), &v) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                    *d += r * g * w - v * k;
                }
            }
        });
    dw
}

/// Softmax of the attention scores of one (sequence, head) `[t, t]` in place, with the
/// causal / window / key-padding mask; a query that sees no key attends uniformly.
fn masked_softmax<T: Real>(s: &mut [T], t: usize, keys: &[bool], window: usize) {
    let uniform = T::one() / T::from_f64(t as f64);
    for (i, row) in s.chunks_exact_mut(t).enumerate() {
        let visible = |j: usize| j <= i && i - j < window && keys[j];
        let mut max = None::<T>;
        for (j, &v) in row.iter().enumerate() {
            if visible(j) && max.is_none_or(|m| v > m) {
                max = Some(v);
            }
        }
        let Some(max) = max else {
            row.fill(uniform);
            continue;
        };
        let mut sum = T::zero();
        for (j, v) in row.iter_mut().enumerate() {
            *v = if visible(j) {
                let e = (*v - max).exp();
                sum += e;
                e
            } else {
                T::zero()
            };
        }
        let inv = T::one() / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

/// One layer's saved activations.
struct Saved<T> {
    x: Vec<T>,
    r1: Vec<T>,
    h1: Vec<T>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    p: Vec<T>,
    att: Vec<T>,
    drop_o: Option<Vec<T>>,
    x2: Vec<T>,
    r2: Vec<T>,
    h2: Vec<T>,
    g: Vec<T>,
    u: Vec<T>,
    a: Vec<T>,
    drop_m: Option<Vec<T>>,
}

/// The shapes of one step.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    n: usize,
    hidden: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
    inter: usize,
    window: usize,
    scale: f64,
}

/// A layer's weights, borrowed.
struct LayerViews<'a> {
    input_norm: View<'a>,
    post_norm: View<'a>,
    proj: [(View<'a>, Option<View<'a>>); 7],
}

impl<'a> LayerViews<'a> {
    fn of(l: &'a Layer) -> Result<Self> {
        let p = |p: &'a Proj| -> Result<(View<'a>, Option<View<'a>>)> {
            Ok((
                View::of(&p.weight)?,
                p.bias.as_ref().map(View::of).transpose()?,
            ))
        };
        Ok(Self {
            input_norm: View::of(&l.input_norm)?,
            post_norm: View::of(&l.post_norm)?,
            proj: [
                p(&l.q)?,
                p(&l.k)?,
                p(&l.v)?,
                p(&l.o)?,
                p(&l.gate)?,
                p(&l.up)?,
                p(&l.down)?,
            ],
        })
    }
}

const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

fn run<T: Real>(
    model: &Model,
    batch: &BatchInfo,
    input_ids: &Tensor,
    label_mask: &Tensor,
    normalizer: Option<f64>,
    mut dropout: Option<(f32, &mut Rng)>,
) -> Result<Gradients> {
    let cfg = &model.config;
    let (b, t) = (batch.b, batch.t);
    let d = Dims {
        b,
        t,
        n: b * t,
        hidden: cfg.hidden_size,
        nh: cfg.num_attention_heads,
        nkv: cfg.num_key_value_heads,
        hd: cfg.head_dim,
        inter: cfg.intermediate_size,
        window: cfg.sliding_window.unwrap_or(usize::MAX),
        scale: 1.0 / (cfg.head_dim as f64).sqrt(),
    };
    let (n, hs) = (d.n, d.hidden);
    // The labels are checked before any work.
    let count = loss::checked_count(b, t, input_ids, label_mask, normalizer)?;
    let labels = label_mask
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let cos_v = View::of(&model.cos)?;
    let sin_v = View::of(&model.sin)?;
    let (cos, sin) = (
        &cos_v.slice::<T>()[..t * d.hd / 2],
        &sin_v.slice::<T>()[..t * d.hd / 2],
    );
    let views = model
        .layers
        .iter()
        .map(LayerViews::of)
        .collect::<Result<Vec<_>>>()?;
    let embed_v = View::of(&model.embed)?;
    let embed = embed_v.slice::<T>();
    let mut x = vec![T::zero(); n * hs];
    for (row, &id) in x.chunks_exact_mut(hs).zip(&batch.ids) {
        let id = id as usize;
        row.copy_from_slice(&embed[id * hs..(id + 1) * hs]);
    }

    let mut saved = Vec::with_capacity(views.len());
    for lv in &views {
        let w = |i: usize| lv.proj[i].0.slice::<T>();
        let bias = |i: usize| lv.proj[i].1.as_ref().map(View::slice::<T>);
        let (h1, r1) = rms_forward(&x, lv.input_norm.slice::<T>(), cfg.rms_norm_eps);
        let mut q = linear(&h1, w(Q), bias(Q), n, hs);
        let mut k = linear(&h1, w(K), bias(K), n, hs);
        let v = linear(&h1, w(V), bias(V), n, hs);
        rotate(&mut q, d.nh * d.hd, &d, cos, sin, false);
        rotate(&mut k, d.nkv * d.hd, &d, cos, sin, false);
        let (p, att) = attention_forward(&q, &k, &v, &d, &batch.keys);
        let mut o = linear(&att, w(O), None, n, d.nh * d.hd);
        let drop_o = apply_dropout(&mut o, &mut dropout);
        let x2: Vec<T> = x.iter().zip(&o).map(|(&a, &b)| a + b).collect();
        drop(o);
        let (h2, r2) = rms_forward(&x2, lv.post_norm.slice::<T>(), cfg.rms_norm_eps);
        let g = linear(&h2, w(GATE), None, n, hs);
        let u = linear(&h2, w(UP), None, n, hs);
        let a = silu_mul(&g, &u);
        let mut m = linear(&a, w(DOWN), None, n, d.inter);
        let drop_m = apply_dropout(&mut m, &mut dropout);
        let x3: Vec<T> = x2.iter().zip(&m).map(|(&a, &b)| a + b).collect();
        saved.push(Saved {
            x: std::mem::replace(&mut x, x3),
            r1,
            h1,
            q,
            k,
            v,
            p,
            att,
            drop_o,
            x2,
            r2,
            h2,
            g,
            u,
            a,
            drop_m,
        });
    }
    let norm_v = View::of(&model.norm)?;
    let (hf, rf) = rms_forward(&x, norm_v.slice::<T>(), cfg.rms_norm_eps);
    let head_v = View::of(&model.lm_head.weight)?;
    let (loss_value, d_hf, d_head) =
        head_loss(&hf, head_v.slice::<T>(), &batch.ids, &labels, count, &d);
    drop((hf, head_v));

    let mut grads: HashMap<TensorId, Tensor> = HashMap::new();
    // Each weight gets one gradient (a tied embedding's two uses are summed before).
    let mut put = |t: &Tensor, g: Vec<T>| -> Result<()> {
        let prev = grads.insert(t.id(), Tensor::from_vec(g, t.shape(), &Device::Cpu)?);
        debug_assert!(prev.is_none(), "one gradient per weight");
        Ok(())
    };
    let mut dx = vec![T::zero(); n * hs];
    let dw = rms_backward(&mut dx, &d_hf, &x, &rf, norm_v.slice::<T>());
    put(&model.norm, dw)?;
    drop(d_hf);

    for ((s, lv), layer) in saved.into_iter().zip(&views).zip(&model.layers).rev() {
        let w = |i: usize| lv.proj[i].0.slice::<T>();
        // The MLP: x3 = x2 + down(silu(gate(h2)) · up(h2)).
        let dm = masked(&dx, s.drop_m.as_deref());
        let (dw, _) = linear_weight_grads(&dm, &s.a, n, d.inter, false);
        put(&layer.down.weight, dw)?;
        let da = linear_input_grad(&dm, w(DOWN), n);
        drop(dm);
        let (dg, du) = silu_mul_backward(&da, &s.g, &s.u);
        drop(da);
        let (dw, _) = linear_weight_grads(&dg, &s.h2, n, hs, false);
        put(&layer.gate.weight, dw)?;
        let (dw, _) = linear_weight_grads(&du, &s.h2, n, hs, false);
        put(&layer.up.weight, dw)?;
        let mut dh2 = linear_input_grad(&dg, w(GATE), n);
        add_linear_input_grad(&mut dh2, &du, w(UP), n);
        drop((dg, du));
        let dw = rms_backward(&mut dx, &dh2, &s.x2, &s.r2, lv.post_norm.slice::<T>());
        put(&layer.post_norm, dw)?;
        drop(dh2);
        // Attention: x2 = x + o(attention(rope(q(h1)), rope(k(h1)), v(h1))).
        let d_o = masked(&dx, s.drop_o.as_deref());
        let (dw, _) = linear_weight_grads(&d_o, &s.att, n, d.nh * d.hd, false);
        put(&layer.o.weight, dw)?;
        let datt = linear_input_grad(&d_o, w(O), n);
        drop(d_o);
        let (mut dq, mut dk, dv) = attention_backward(&datt, &s, &d, &batch.keys);
        drop(datt);
        rotate(&mut dq, d.nh * d.hd, &d, cos, sin, true);
        rotate(&mut dk, d.nkv * d.hd, &d, cos, sin, true);
        let mut dh1 = linear_input_grad(&dq, w(Q), n);
        add_linear_input_grad(&mut dh1, &dk, w(K), n);
        add_linear_input_grad(&mut dh1, &dv, w(V), n);
        for (dy, proj) in [(&dq, &layer.q), (&dk, &layer.k), (&dv, &layer.v)] {
            let (dw, db) = linear_weight_grads(dy, &s.h1, n, hs, proj.bias.is_some());
            put(&proj.weight, dw)?;
            if let (Some(bias), Some(db)) = (&proj.bias, db) {
                put(bias, db)?;
            }
        }
        drop((dq, dk, dv));
        let dw = rms_backward(&mut dx, &dh1, &s.x, &s.r1, lv.input_norm.slice::<T>());
        put(&layer.input_norm, dw)?;
    }
    // The embedding rows of the batch's tokens: added into the LM head's gradient when the
    // two are one tensor, else into their own.
    let tied = model.embed.id() == model.lm_head.weight.id();
    let mut d_embed = if tied {
        d_head
    } else {
        put(&model.lm_head.weight, d_head)?;
        vec![T::zero(); model.config.vocab_size * hs]
    };
    for (row, &id) in dx.chunks_exact(hs).zip(&batch.ids) {
        let id = id as usize;
        for (e, &g) in d_embed[id * hs..(id + 1) * hs].iter_mut().zip(row) {
            *e += g;
        }
    }
    put(&model.embed, d_embed)?;
    Ok(Gradients {
        loss: loss_value,
        grads,
    })
}

/// Draw a dropout mask into `y` (in place) when training with dropout; returns the mask.
fn apply_dropout<T: Real>(y: &mut [T], dropout: &mut Option<(f32, &mut Rng)>) -> Option<Vec<T>> {
    let (p, rng) = dropout.as_mut()?;
    if *p <= 0.0 {
        return None;
    }
    let mask: Vec<T> = dropout_mask(y.len(), *p, rng)
        .into_iter()
        .map(|m| T::from_f64(f64::from(m)))
        .collect();
    for (v, &m) in y.iter_mut().zip(&mask) {
        *v *= m;
    }
    Some(mask)
}

/// `g ⊙ mask`, or `g` itself without one.
fn masked<'a, T: Real>(g: &'a [T], mask: Option<&[T]>) -> Cow<'a, [T]> {
    match mask {
        Some(m) => Cow::Owned(g.iter().zip(m).map(|(&g, &m)| g * m).collect()),
        None => Cow::Borrowed(g),
    }
}

fn sigmoid<T: Real>(v: T) -> T {
    T::one() / (T::one() + (T::zero() - v).exp())
}

/// `silu(g) ⊙ u`.
fn silu_mul<T: Real>(g: &[T], u: &[T]) -> Vec<T> {
    let mut a = vec![T::zero(); g.len()];
    a.par_chunks_mut(1 << 14)
        .zip(g.par_chunks(1 << 14).zip(u.par_chunks(1 << 14)))
        .for_each(|(a, (g, u))| {
            for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                *a = g / (T::one() + (T::zero() - g).exp()) * u;
            }
        });
    a
}

/// Backward of [`silu_mul`]: `(dg, du)`.
fn silu_mul_backward<T: Real>(da: &[T], g: &[T], u: &[T]) -> (Vec<T>, Vec<T>) {
    let mut dg = vec![T::zero(); g.len()];
    let mut du = vec![T::zero(); g.len()];
    const C: usize = 1 << 14;
    dg.par_chunks_mut(C)
        .zip(du.par_chunks_mut(C))
        .zip(da.par_chunks(C).zip(g.par_chunks(C)).zip(u.par_chunks(C)))
        .for_each(|((dg, du), ((da, g), u))| {
            for ((((dg, du), &da), &g), &u) in dg.iter_mut().zip(du).zip(da).zip(g).zip(u) {
                let s = sigmoid(g);
                *du = da * g * s;
                *dg = da * u * s * (T::one() + g * (T::one() - s));
            }
        });
    (dg, du)
}

/// Rotate every `hd`-wide head of each row of `x` (`[b·t, heads·hd]`, row `i` at position
/// `i mod t`) by the rotary tables `[t, hd / 2]` (`rotate_half` convention); `inverse`
/// rotates back, which is the backward.
fn rotate<T: Real>(x: &mut [T], width: usize, d: &Dims, cos: &[T], sin: &[T], inverse: bool) {
    let (hd, t) = (d.hd, d.t);
    let half = hd / 2;
    x.par_chunks_mut(width * ROW_CHUNK)
        .enumerate()
        .for_each(|(c, rows)| {
            for (j, row) in rows.chunks_exact_mut(width).enumerate() {
                let pos = (c * ROW_CHUNK + j) % t;
                let (cos, sin) = (
                    &cos[pos * half..(pos + 1) * half],
                    &sin[pos * half..(pos + 1) * half],
                );
                for head in row.chunks_exact_mut(hd) {
                    let (x1, x2) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (x1[i], x2[i]);
                        let (c, s) = (cos[i], sin[i]);
                        if inverse {
                            x1[i] = a * c + b * s;
                            x2[i] = b * c - a * s;
                        } else {
                            x1[i] = a * c - b * s;
                            x2[i] = b * c + a * s;
                        }
                    }
                }
            }
        });
}

/// Query rows per block of the attention products: a block's keys end where its last
/// query's do (causal), so the products skip the masked upper triangle.
const ATT_ROWS: usize = 64;

/// For each query row block of one sequence, the keys its products cover: up to its last
/// row, or all `t` when a row sees no key at all (it attends uniformly to every key).
fn key_extents(t: usize, keys: &[bool], window: usize) -> Vec<(usize, usize, usize)> {
    (0..t)
        .step_by(ATT_ROWS)
        .map(|r0| {
            let r1 = (r0 + ATT_ROWS).min(t);
            let blind = (r0..r1).any(|i| !(0..=i).any(|j| i - j < window && keys[j]));
            (r0, r1, if blind { t } else { r1 })
        })
        .collect()
}

/// Attention of every (sequence, query head): probabilities `[b, nh, t, t]` and the output
/// `[b·t, nh·hd]`.
fn attention_forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    d: &Dims,
    keys: &[bool],
) -> (Vec<T>, Vec<T>) {
    let (t, hd) = (d.t, d.hd);
    let (qw, kw) = (d.nh * hd, d.nkv * hd);
    let groups = d.nh / d.nkv;
    let mut p = vec![T::zero(); d.b * d.nh * t * t];
    let mut att = vec![T::zero(); d.n * qw];
    p.par_chunks_mut(d.nh * t * t)
        .zip(att.par_chunks_mut(t * qw))
        .enumerate()
        .for_each(|(bi, (p, att))| {
            let q = &q[bi * t * qw..(bi + 1) * t * qw];
            let (k, v) = (
                &k[bi * t * kw..(bi + 1) * t * kw],
                &v[bi * t * kw..(bi + 1) * t * kw],
            );
            let keys = &keys[bi * t..(bi + 1) * t];
            let blocks = key_extents(t, keys, d.window);
            for (h, p) in p.chunks_exact_mut(t * t).enumerate() {
                let j = h / groups;
                // Scores of visible keys only; the rest of each row stays 0 (masked).
                for &(r0, r1, _) in &blocks {
                    gemm(
                        &mut p[r0 * t..],
                        t,
                        (r1 - r0, r1, hd),
                        at(q, r0 * qw + h * hd, qw),
                        at(k, j * hd, kw).t(),
                        T::from_f64(d.scale),
                        false,
                        false,
                    );
                }
                masked_softmax(p, t, keys, d.window);
                for &(r0, r1, ext) in &blocks {
                    gemm(
                        &mut att[r0 * qw + h * hd..],
                        qw,
                        (r1 - r0, hd, ext),
                        at(p, r0 * t, t),
                        at(v, j * hd, kw),
                        T::one(),
                        false,
                        false,
                    );
                }
            }
        });
    (p, att)
}

/// Backward of [`attention_forward`] for `datt` `[b·t, nh·hd]`: the gradients of the
/// rotated q, the rotated k and v.
fn attention_backward<T: Real>(
    datt: &[T],
    s: &Saved<T>,
    d: &Dims,
    keys: &[bool],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (t, hd) = (d.t, d.hd);
    let (qw, kw) = (d.nh * hd, d.nkv * hd);
    let groups = d.nh / d.nkv;
    let scale = T::from_f64(d.scale);
    let mut dq = vec![T::zero(); d.n * qw];
    let mut dk = vec![T::zero(); d.n * kw];
    let mut dv = vec![T::zero(); d.n * kw];
    dq.par_chunks_mut(t * qw)
        .zip(dk.par_chunks_mut(t * kw).zip(dv.par_chunks_mut(t * kw)))
        .enumerate()
        .for_each(|(bi, (dq, (dk, dv)))| {
            let q = &s.q[bi * t * qw..(bi + 1) * t * qw];
            let datt = &datt[bi * t * qw..(bi + 1) * t * qw];
            let (k, v) = (
                &s.k[bi * t * kw..(bi + 1) * t * kw],
                &s.v[bi * t * kw..(bi + 1) * t * kw],
            );
            let p_all = &s.p[bi * d.nh * t * t..(bi + 1) * d.nh * t * t];
            let blocks = key_extents(t, &keys[bi * t..(bi + 1) * t], d.window);
            let mut ds = vec![T::zero(); ATT_ROWS * t];
            for h in 0..d.nh {
                let j = h / groups;
                let p = &p_all[h * t * t..(h + 1) * t * t];
                for &(r0, r1, ext) in &blocks {
                    let rows = r1 - r0;
                    let doh = at(datt, r0 * qw + h * hd, qw);
                    // dp = dO · vᵀ, then ds = p ⊙ (dp − Σ dp ⊙ p), over the block's keys.
                    gemm(
                        &mut ds,
                        ext,
                        (rows, ext, hd),
                        doh,
                        at(v, j * hd, kw).t(),
                        T::one(),
                        false,
                        false,
                    );
                    let pb = &p[r0 * t..r1 * t];
                    for (ds, p) in ds.chunks_exact_mut(ext).zip(pb.chunks_exact(t)) {
                        let p = &p[..ext];
                        let mut dot = T::zero();
                        for (&g, &p) in ds.iter().zip(p) {
                            dot += g * p;
                        }
                        for (g, &p) in ds.iter_mut().zip(p) {
                            *g = p * (*g - dot);
                        }
                    }
                    let dsb = rows_of(&ds[..rows * ext], ext);
                    gemm(
                        &mut dq[r0 * qw + h * hd..],
                        qw,
                        (rows, hd, ext),
                        dsb,
                        at(k, j * hd, kw),
                        scale,
                        false,
                        false,
                    );
                    gemm(
                        &mut dk[j * hd..],
                        kw,
                        (ext, hd, rows),
                        dsb.t(),
                        at(q, r0 * qw + h * hd, qw),
                        scale,
                        true,
                        false,
                    );
                    gemm(
                        &mut dv[j * hd..],
                        kw,
                        (ext, hd, rows),
                        at(pb, 0, t).t(),
                        doh,
                        T::one(),
                        true,
                        false,
                    );
                }
            }
        });
    (dq, dk, dv)
}

/// The LM head and the masked next-token cross-entropy over the final hidden states `hf`
/// (`[b·t, hidden]`) and their gradients: `(loss, d_hf, d_weight)`, as
/// `loss::lm_head_loss_grads` computes them. Only positions whose target counts
/// (`labels[i + 1] ≠ 0`) are multiplied out. Per vocabulary chunk the logits are turned into
/// `exp(x − chunk max)` in place while the log-sum-exp is gathered, then scaled to
/// `dlogits = softmax · w − one-hot · w` (`w` = label / `count`), which both products read.
fn head_loss<T: Real>(
    hf: &[T],
    weight: &[T],
    ids: &[u32],
    labels: &[f64],
    count: f64,
    d: &Dims,
) -> (f64, Vec<T>, Vec<T>) {
    let hs = d.hidden;
    let vocab = weight.len() / hs;
    // (row of hf, target, weight) of every counted position.
    let rows: Vec<(usize, usize, T)> = (0..d.b)
        .flat_map(|bi| (0..d.t - 1).map(move |i| bi * d.t + i))
        .filter(|&r| labels[r + 1] != 0.0)
        .map(|r| (r, ids[r + 1] as usize, T::from_f64(labels[r + 1] / count)))
        .collect();
    let na = rows.len();
    let mut h = vec![T::zero(); na * hs];
    for (dst, &(r, _, _)) in h.chunks_exact_mut(hs).zip(&rows) {
        dst.copy_from_slice(&hf[r * hs..(r + 1) * hs]);
    }
    let starts: Vec<usize> = (0..vocab).step_by(loss::VOCAB_CHUNK).collect();
    let width = |c0: usize| loss::VOCAB_CHUNK.min(vocab - c0);
    // exp(logit − row max) per chunk, with each row's max and sum.
    let mut chunks: Vec<(Vec<T>, Vec<T>, Vec<T>)> = Vec::with_capacity(starts.len());
    for &c0 in &starts {
        let c = width(c0);
        let mut e = product(
            (na, c, hs),
            rows_of(&h, hs),
            rows_of(&weight[c0 * hs..(c0 + c) * hs], hs).t(),
        );
        let mut max = vec![T::zero(); na];
        let mut sum = vec![T::zero(); na];
        e.par_chunks_mut(c * ROW_CHUNK)
            .zip(
                max.par_chunks_mut(ROW_CHUNK)
                    .zip(sum.par_chunks_mut(ROW_CHUNK)),
            )
            .for_each(|(e, (max, sum))| {
                for ((row, m), s) in e.chunks_exact_mut(c).zip(max).zip(sum) {
                    *m = row
                        .iter()
                        .copied()
                        .fold(row[0], |a, v| if v > a { v } else { a });
                    let mut acc = T::zero();
                    for v in row.iter_mut() {
                        *v = (*v - *m).exp();
                        acc += *v;
                    }
                    *s = acc;
                }
            });
        chunks.push((e, max, sum));
    }
    // Each row's log-sum-exp over the chunks, and the loss.
    let lse: Vec<T> = (0..na)
        .map(|r| {
            let m = chunks
                .iter()
                .map(|(_, max, _)| max[r])
                .fold(chunks[0].1[r], |a, v| if v > a { v } else { a });
            let mut s = T::zero();
            for (_, max, sum) in &chunks {
                s += sum[r] * (max[r] - m).exp();
            }
            T::from_f64(m.to_f64() + s.to_f64().ln())
        })
        .collect();
    let mut loss_value = 0.0;
    for (i, &(_, target, w)) in rows.iter().enumerate() {
        let mut logit = T::zero();
        for (&a, &b) in h[i * hs..(i + 1) * hs]
            .iter()
            .zip(&weight[target * hs..(target + 1) * hs])
        {
            logit += a * b;
        }
        loss_value += (w * (lse[i] - logit)).to_f64();
    }
    let mut dh = vec![T::zero(); na * hs];
    // Written chunk by chunk below (every row of the vocabulary once).
    let mut d_weight: Vec<T> = Vec::with_capacity(vocab * hs);
    for (&c0, (mut e, max, _)) in starts.iter().zip(chunks) {
        let c = width(c0);
        e.par_chunks_mut(c * ROW_CHUNK)
            .enumerate()
            .for_each(|(k, e)| {
                for (j, row) in e.chunks_exact_mut(c).enumerate() {
                    let r = k * ROW_CHUNK + j;
                    let (_, target, w) = rows[r];
                    let f = (max[r] - lse[r]).exp() * w;
                    for v in row.iter_mut() {
                        *v *= f;
                    }
                    if (c0..c0 + c).contains(&target) {
                        row[target - c0] -= w;
                    }
                }
            });
        gemm(
            &mut dh,
            hs,
            (na, hs, c),
            rows_of(&e, c),
            rows_of(&weight[c0 * hs..(c0 + c) * hs], hs),
            T::one(),
            true,
            true,
        );
        let spare = &mut d_weight.spare_capacity_mut()[..c * hs];
        let len = spare.len();
        gemm_raw(
            spare.as_mut_ptr().cast::<T>(),
            len,
            hs,
            (c, hs, na),
            (rows_of(&e, c).t(), rows_of(&h, hs)),
            T::one(),
            false,
            true,
        );
        set_written_len(&mut d_weight, (c0 + c) * hs);
    }
    let mut d_hf = vec![T::zero(); hf.len()];
    for (src, &(r, _, _)) in dh.chunks_exact(hs).zip(&rows) {
        d_hf[r * hs..(r + 1) * hs].copy_from_slice(src);
    }
    (loss_value, d_hf, d_weight)
}
