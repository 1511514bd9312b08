//! Serving weights packed into panels for the CPU's matrix products of a decode step.
//!
//! `x [n, in] · wᵀ` with few activation rows is bound by reading the weight once. A general
//! GEMM packs the weight into panels on every call, which costs more than the product itself
//! at these sizes. [`PackedWeight`] packs it once, at model load: panels of [`PANEL`] output
//! rows, stored input-position-major, so one step of the inner loop loads `PANEL` weights as
//! whole vectors and multiplies them by one broadcast activation per row (an outer product,
//! as in GEMM micro-kernels: no horizontal sums). A tile keeps `PANEL × R` accumulators in
//! registers (`R` up to 4 rows with AVX-512, 1 with AVX2). Panels are walked 32 or 64 input
//! positions at a time (by the number of rows) so that slice stays in L1 for every group of
//! rows (the next slice is prefetched into L2 meanwhile). A product of several rows, or of
//! several weights of the same input (a layer's q, k and v; gate and up), is one parallel
//! pass: every (panel, row group) of every weight, in order, split into one contiguous share
//! of equal work per rayon thread ([`multiply_rows`]), each block stored straight into the
//! `[n, out]` result. The loops are plain Rust compiled for the best instruction set the CPU
//! has at run time (`pulp` dispatch). CPUs without AVX2 (and non-x86 ones) keep candle's
//! matmul: [`PackedWeight::pack`] declines there.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::model::Model;

/// Output rows per panel: four AVX-512 or eight AVX2 vectors.
pub const PANEL: usize = 64;

/// Activation rows up to which the serving forward uses the packed weight with AVX-512
/// ([`max_rows`]). Measured on the `small` shape's products (2 threads,
/// `examples/packed_vs_gemm.rs`, a 2-core AMD EPYC with AVX-512): at 32 rows the packed
/// product takes 0.31 / 0.38 / 10.7 ms (576→1536, 1536→576, the 576→49152 LM head) against
/// candle's gemm at 0.64 / 2.39 / 18.8 ms. From 128 rows on the two are within a few percent
/// but for 1536→576 (packed 1.3–5.0 ms against 3.3–6.8 up to 512 rows); prefill chunks of
/// 512 and 1024 rows (`examples/decode_steps.rs`) were no faster, or slower, on the packed
/// weights (each panel re-reads every activation row from L3), so they stay on the gemm.
pub const MAX_ROWS: usize = 64;

/// With AVX2 a tile holds one activation row, so every further row streams each panel
/// again; the old row-dot kernel lost to candle's gemm from about 10 rows there.
const MAX_ROWS_AVX2: usize = 8;

/// Whether pulp runs this CPU's products with AVX-512 (its `V4` level needs more than
/// `avx512f`).
fn has_v4() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        pulp::x86::V4::try_new().is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU has 256-bit FMA vectors at least (pulp's `V3`).
fn has_v3() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        pulp::x86::V3::try_new().is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Activation rows up to which this CPU's serving forward uses packed weights without AMX
/// (with it, [`PackedWeight::max_rows`] takes them all).
pub fn max_rows() -> usize {
    if has_v4() { MAX_ROWS } else { MAX_ROWS_AVX2 }
}

/// How a model's f32 serving products are computed ([`Model::pack_for_serving_with`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Products {
    /// Exact f32 sums (FMA kernels, and candle's gemm for long prefill chunks).
    Exact,
    /// Products of [`crate::amx::MIN_ROWS`] rows or more on AMX tiles, each f32 split into
    /// two bf16 halves ([`crate::amx`]), where the CPU has AMX; exact elsewhere.
    Amx,
}

impl F32Products {
    /// [`Self::Amx`] unless `LMFORGE_AMX=0` turned AMX off.
    pub fn default_for_this_cpu() -> Self {
        if crate::amx::available() {
            Self::Amx
        } else {
            Self::Exact
        }
    }
}

/// A `[out, in]` f32 weight packed into `out / PANEL` (rounded up) panels of `[in, PANEL]`,
/// the last padded with zeros.
#[derive(Debug)]
pub struct PackedWeight {
    data: Vec<f32>,
    /// The same weight in AMX tiles, where the CPU has AMX.
    amx: Option<crate::amx::Tiles>,
    out: usize,
    k: usize,
}

/// Input positions per pass over a panel: a `KC × PANEL` slice of it (16 KiB) stays in L1
/// while every tile group of activation rows multiplies it, instead of each group streaming
/// the whole panel from L2.
const KC: usize = 64;

/// Input positions per pass over a panel for a product of `rows` activation rows: half of
/// [`KC`] from 8 to 48 rows. Measured on `small` decode steps (`examples/decode_steps.rs`,
/// steps of the two lengths alternating in one process, a 2-core AMD EPYC with AVX-512),
/// with 4-row tiles: 32-position slices take 17% off a step at 16 rows and 4-5% at 32, but
/// add 6-7% at 4 rows and 1-3% at 64 (with the earlier 6-row tiles: -10% at 8 and 12 rows,
/// -2-5% at 40-48, +2-9% at 4-6). The sums run in input order either way: the same bits.
fn slice_len(rows: usize) -> usize {
    if (8..=48).contains(&rows) { KC / 2 } else { KC }
}

/// Multiply a slice of input positions ([`slice_len`]) of a panel by `R` activation rows
/// (`xs` holds the rows from the first of them on, `k` apart; `c0` is the first input
/// position), adding into `acc` (row `r`'s sums at `acc[r·V..]`): one load of each weight
/// vector and one broadcast per row for every input position, no horizontal sums. The rows
/// are read where they lie (one stream each, `R` + 1 streams with the panel's), so a product
/// needs no copy of its input. With AVX-512 a panel is 4 vectors, so even one row has 4
/// independent FMA chains, and 4 rows keep 16 accumulators in registers (8 loads per 16
/// FMAs). Every output is summed in input order whatever `R` is (and whatever the slice
/// length): up to [`max_rows`] rows, a row's product does not depend on what else is in the
/// batch (larger batches go through candle's gemm; attention of a lone decode token differs
/// from a group's).
#[inline(always)]
fn tile<S: pulp::Simd, const V: usize, const R: usize>(
    simd: S,
    panel: &[S::f32s],
    xs: &[f32],
    k: usize,
    c0: usize,
    acc: &mut [S::f32s],
) {
    let c = panel.len() / V;
    let rows: [&[f32]; R] = std::array::from_fn(|r| &xs[r * k + c0..r * k + c0 + c]);
    let mut sums: [[S::f32s; V]; R] = std::array::from_fn(|r| {
        let a = &acc[r * V..(r + 1) * V];
        std::array::from_fn(|v| a[v])
    });
    for (i, w) in panel.chunks_exact(V).enumerate() {
        let w: [S::f32s; V] = std::array::from_fn(|v| w[v]);
        for (sums, row) in sums.iter_mut().zip(&rows) {
            let b = simd.splat_f32s(row[i]);
            for v in 0..V {
                sums[v] = simd.mul_add_e_f32s(w[v], b, sums[v]);
            }
        }
    }
    for (r, sums) in sums.iter().enumerate() {
        acc[r * V..(r + 1) * V].copy_from_slice(sums);
    }
}

/// Ask for `data` in L2 (one hint per cache line) without waiting for it.
#[inline(always)]
pub(crate) fn prefetch_l2<T>(data: Option<&[T]>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(data) = data {
        let bytes = std::mem::size_of_val(data);
        let base = data.as_ptr().cast::<i8>();
        for off in (0..bytes).step_by(64) {
            // SAFETY: a prefetch is a hint: it never faults and has no architectural effect;
            // the address is inside `data` anyway.
            #[allow(unsafe_code)]
            unsafe {
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                    base.add(off),
                );
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Activation rows `[n, k]` (read in place) in tile groups of `R` rows each.
struct Groups<'a> {
    /// `(first row, rows)` per group.
    spans: Vec<(usize, usize)>,
    xs: &'a [f32],
}

impl<'a> Groups<'a> {
    fn new(xs: &'a [f32], n: usize, widths: &[usize]) -> Self {
        let mut spans = Vec::new();
        let mut r0 = 0;
        while r0 < n {
            let r = *widths
                .iter()
                .find(|&&w| w <= n - r0)
                .expect("widths end with 1");
            spans.push((r0, r));
            r0 += r;
        }
        Self { spans, xs }
    }
}

/// `P` consecutive panels (`w`) times one activation row `x`, written to `dst` (`P` blocks
/// of `PANEL`): `P × V` accumulators, every panel's stream advanced once per input.
#[inline(always)]
fn one_row_block<S: pulp::Simd, const V: usize, const P: usize>(
    simd: S,
    w: &[S::f32s],
    x: &[f32],
    dst: &mut [f32],
) {
    let k = x.len();
    let mut streams: [std::slice::ChunksExact<'_, S::f32s>; P] =
        std::array::from_fn(|j| w[j * k * V..(j + 1) * k * V].chunks_exact(V));
    let mut sums = [[simd.splat_f32s(0.0); V]; P];
    for &x in x {
        let b = simd.splat_f32s(x);
        for (sums, stream) in sums.iter_mut().zip(&mut streams) {
            let w = stream.next().expect("k vectors a panel");
            for v in 0..V {
                sums[v] = simd.mul_add_e_f32s(w[v], b, sums[v]);
            }
        }
    }
    for (sums, dst) in sums.iter().zip(dst.chunks_exact_mut(PANEL)) {
        S::as_mut_simd_f32s(dst).0[..V].copy_from_slice(sums);
    }
}

/// One task's panels (`panels`, and `out` of `panels / (k·PANEL)` blocks of `PANEL`) times
/// one activation row `x` (a lone decode step).
struct OneRow<'a> {
    panels: &'a [f32],
    x: &'a [f32],
    out: &'a mut [f32],
}

impl OneRow<'_> {
    /// `P` panels at a time, so the weight is read as `P` concurrent streams (one sequential
    /// stream leaves memory bandwidth unused), each output summed in input order as [`tile`]
    /// does.
    #[inline(always)]
    fn run<S: pulp::Simd, const V: usize, const P: usize>(self, simd: S) {
        let OneRow { panels, x, out } = self;
        let k = x.len();
        let (vecs, _) = S::as_simd_f32s(panels);
        let mut blocks = vecs.chunks_exact(P * k * V);
        let mut dsts = out.chunks_exact_mut(P * PANEL);
        for (w, dst) in (&mut blocks).zip(&mut dsts) {
            one_row_block::<S, V, P>(simd, w, x, dst);
        }
        for (w, dst) in blocks
            .remainder()
            .chunks_exact(k * V)
            .zip(dsts.into_remainder().chunks_exact_mut(PANEL))
        {
            one_row_block::<S, V, 1>(simd, w, x, dst);
        }
    }

    /// Without 256-bit vectors (not reached: [`PackedWeight::pack`] declines there): one dot
    /// product at a time, in input order (unfused, so not [`tile`]'s bits).
    fn run_scalar(self) {
        let k = self.x.len();
        for (panel, out) in self
            .panels
            .chunks_exact(k * PANEL)
            .zip(self.out.chunks_exact_mut(PANEL))
        {
            for (c, d) in out.iter_mut().enumerate() {
                *d = (0..k).map(|i| panel[i * PANEL + c] * self.x[i]).sum();
            }
        }
    }
}

impl pulp::WithSimd for OneRow<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        match S::F32_LANES {
            // Four panels' 16 accumulators fit AVX-512's registers, not AVX2's.
            16 => self.run::<S, 4, 4>(simd),
            8 => self.run::<S, 8, 1>(simd),
            _ => self.run_scalar(),
        }
    }
}

/// A `[n, width]` result that several rayon tasks write at once, each to its own (row,
/// panel) blocks ([`multiply_rows`], and the AMX pass).
pub(crate) struct Out {
    pub(crate) ptr: *mut f32,
    pub(crate) len: usize,
}

// SAFETY: the passes give each block of a result to one task, which writes it through `ptr`,
// and the buffer outlives every task (a pass joins them before using it).
#[allow(unsafe_code)]
unsafe impl Send for Out {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for Out {}

/// The `[n, count · PANEL]` results of a pass over several weights (`counts` panels each),
/// not yet written, and an [`Out`] for each.
pub(crate) struct Results {
    pub(crate) results: Vec<Vec<f32>>,
    pub(crate) outs: Vec<Out>,
}

impl Results {
    pub(crate) fn new(n: usize, counts: &[usize]) -> Self {
        let mut results: Vec<Vec<f32>> = counts
            .iter()
            .map(|c| Vec::with_capacity(n * c * PANEL))
            .collect();
        let outs = results
            .iter_mut()
            .zip(counts)
            .map(|(res, c)| Out {
                ptr: res.as_mut_ptr(),
                len: n * c * PANEL,
            })
            .collect();
        Self { results, outs }
    }

    /// The results, once the pass wrote every value of them.
    ///
    /// # Safety
    /// Every one of the `n · count · PANEL` values of every result has been written.
    #[allow(unsafe_code)]
    pub(crate) unsafe fn written(self) -> Vec<Vec<f32>> {
        let Self { mut results, outs } = self;
        for (res, out) in results.iter_mut().zip(&outs) {
            // SAFETY: the caller's promise; the result was made with `out.len` of capacity.
            unsafe { res.set_len(out.len) };
        }
        results
    }
}

/// Some of the row groups (`groups.spans[span]`) times one panel (`panel` of `data`'s
/// `[panels, k, PANEL]`), stored into the panel's columns of `out` (`width` a row).
struct PanelRows<'a> {
    data: &'a [f32],
    panel: usize,
    groups: &'a Groups<'a>,
    span: std::ops::Range<usize>,
    k: usize,
    out: &'a Out,
    width: usize,
    /// Input positions per pass over the panel ([`slice_len`]).
    slice: usize,
}

impl PanelRows<'_> {
    /// The first row and the number of rows of the span.
    fn rows(&self) -> (usize, usize) {
        let spans = &self.groups.spans[self.span.clone()];
        let first = spans.first().map_or(0, |s| s.0);
        let end = spans.last().map_or(0, |s| s.0 + s.1);
        (first, end - first)
    }

    /// Store `PANEL` values (`src`) as row `row`'s columns of this panel in `out`.
    fn store(&self, row: usize, src: &[f32]) {
        let at = row * self.width + self.panel * PANEL;
        assert!(src.len() == PANEL && at + PANEL <= self.out.len);
        assert!(self.panel * PANEL + PANEL <= self.width);
        // SAFETY: inside the buffer (checked above), which `src` (our own accumulators) does
        // not overlap; [`multiply_rows`] gives each (row, panel) block to exactly one
        // `PanelRows`, which stores it once. Raw stores: the buffer is not initialized yet.
        #[allow(unsafe_code)]
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.out.ptr.add(at), PANEL);
        }
    }

    /// The panel is walked `self.slice` input positions at a time, so that slice stays in L1
    /// for every group of rows, while the next slice is prefetched into L2, a share per group.
    #[inline(always)]
    fn run<S: pulp::Simd, const V: usize>(self, simd: S) {
        assert_eq!(V * S::F32_LANES, PANEL);
        let k = self.k;
        let (vecs, _) = S::as_simd_f32s(self.data);
        let base = self.panel * k * V;
        let panel = &vecs[base..base + k * V];
        let spans = &self.groups.spans[self.span.clone()];
        let (first, rows) = self.rows();
        let zero = simd.splat_f32s(0.0);
        let mut acc = vec![zero; rows * V];
        let kc = self.slice;
        for c0 in (0..k).step_by(kc) {
            let c1 = (c0 + kc).min(k);
            let pw = &panel[c0 * V..c1 * V];
            let next =
                &vecs[(base + c1 * V).min(vecs.len())..(base + (c1 + kc) * V).min(vecs.len())];
            let share = next.len().div_ceil(spans.len()).max(1);
            for (g, &(r0, r)) in spans.iter().enumerate() {
                prefetch_l2(next.get(g * share..((g + 1) * share).min(next.len())));
                let xs = &self.groups.xs[r0 * k..(r0 + r) * k];
                let acc = &mut acc[(r0 - first) * V..(r0 - first + r) * V];
                match r {
                    4 => tile::<S, V, 4>(simd, pw, xs, k, c0, acc),
                    2 => tile::<S, V, 2>(simd, pw, xs, k, c0, acc),
                    _ => tile::<S, V, 1>(simd, pw, xs, k, c0, acc),
                }
            }
        }
        let mut row = [0f32; PANEL];
        for (i, sums) in acc.chunks_exact(V).enumerate() {
            S::as_mut_simd_f32s(&mut row).0[..V].copy_from_slice(sums);
            self.store(first + i, &row);
        }
    }

    /// Without 256-bit vectors (not reached: [`PackedWeight::pack`] declines there).
    fn run_scalar(self) {
        let k = self.k;
        let panel = &self.data[self.panel * k * PANEL..(self.panel + 1) * k * PANEL];
        let (first, rows) = self.rows();
        for row in first..first + rows {
            let x = &self.groups.xs[row * k..(row + 1) * k];
            let sums: Vec<f32> = (0..PANEL)
                .map(|c| (0..k).map(|i| panel[i * PANEL + c] * x[i]).sum())
                .collect();
            self.store(row, &sums);
        }
    }
}

impl pulp::WithSimd for PanelRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        match S::F32_LANES {
            16 => self.run::<S, 4>(simd),
            8 => self.run::<S, 8>(simd),
            _ => self.run_scalar(),
        }
    }
}

/// Where each of (at most) `tasks` rayon tasks starts and the last ends, in units of
/// `(panel, row group)` (`panel · groups + group`) over `panels` panels of `n` rows in the
/// groups `spans`: task `t` starts at the first group boundary at or after `t / tasks` of
/// the `panels × n` rows, so the shares differ by less than a group's rows.
fn shares(spans: &[(usize, usize)], n: usize, panels: usize, tasks: usize) -> Vec<usize> {
    let g = spans.len();
    let tasks = tasks.clamp(1, (panels * g).max(1));
    (0..=tasks)
        .map(|t| {
            let at = panels * n * t / tasks;
            let (panel, row) = (at / n, at % n);
            panel * g + spans.iter().position(|s| s.0 >= row).unwrap_or(g)
        })
        .collect()
}

/// `xs [n, k] · wᵀ` for each of several packed weights of `k` inputs, `n ≥ 2`: the
/// `[n, panels · PANEL]` results, in one parallel pass (a layer's q, k and v, or gate and
/// up, read the same activations, in place, in tile groups). The work, every (panel, row
/// group) of every weight in order, is split into one contiguous share of equal rows ×
/// panels per rayon task, cut at group boundaries: an odd panel count (the `small` shape's
/// 3- and 9-panel products) no longer leaves a thread idle for a panel. A task stores each
/// block of its result straight into the `[n, width]` rows (no transpose). Each output is
/// the same whatever the split ([`tile`]).
fn multiply_rows(weights: &[&PackedWeight], xs: &[f32], n: usize, k: usize) -> Vec<Vec<f32>> {
    assert!(n >= 1 && xs.len() == n * k && weights.iter().all(|w| w.k == k));
    let groups = Groups::new(xs, n, tile_widths());
    let g = groups.spans.len();
    let counts: Vec<usize> = weights.iter().map(|w| w.out.div_ceil(PANEL)).collect();
    let total: usize = counts.iter().sum();
    let bounds = shares(&groups.spans, n, total, rayon::current_num_threads());
    let results = Results::new(n, &counts);
    let (arch, slice) = (pulp::Arch::new(), slice_len(n));
    bounds.par_windows(2).for_each(|b| {
        let (mut unit, end) = (b[0], b[1]);
        while unit < end {
            let (mut panel, g0) = (unit / g, unit % g);
            let g1 = g.min(end - panel * g);
            unit = panel * g + g1;
            let mut w = 0;
            while panel >= counts[w] {
                panel -= counts[w];
                w += 1;
            }
            arch.dispatch(PanelRows {
                data: &weights[w].data,
                panel,
                groups: &groups,
                span: g0..g1,
                k,
                out: &results.outs[w],
                width: counts[w] * PANEL,
                slice,
            });
        }
    });
    // SAFETY: the tasks' shares together cover every (panel, row group) unit of every weight
    // once, and each unit stores all of its rows' `PANEL` columns.
    #[allow(unsafe_code)]
    unsafe {
        results.written()
    }
}

/// Tile widths (activation rows per tile) for the CPU's vectors: the `PANEL × R`
/// accumulators must fit the register file (16 of AVX-512's 32 registers at `R` = 4, 8 of
/// AVX2's 16 at `R` = 1). Tiles of 6 rows (24 accumulators, fewer weight loads per FMA) were
/// slower: `small` decode steps alternating with 4-row tiles in one process
/// (`examples/decode_steps.rs`) took 10-12% longer at 16 rows, about 5% at 32 and 2-4% at
/// 48-64; 5-row tiles 2-5% longer than 4. Why was not established.
fn tile_widths() -> &'static [usize] {
    if has_v4() { &[4, 2, 1] } else { &[1] }
}

impl PackedWeight {
    /// Pack a 2-D f32 CPU weight `[out, in]`; `None` for any other, and on CPUs without
    /// AVX2 and FMA, where candle's matmul is the better choice. With AMX
    /// ([`F32Products::default_for_this_cpu`]) it also gets AMX tiles.
    pub fn pack(w: &Tensor) -> Result<Option<Self>> {
        Self::pack_with(w, F32Products::default_for_this_cpu())
    }

    /// [`Self::pack`] for the given kind of products.
    pub fn pack_with(w: &Tensor, products: F32Products) -> Result<Option<Self>> {
        let Ok((out, k)) = w.dims2() else {
            return Ok(None);
        };
        if out == 0
            || k == 0
            || w.dtype() != DType::F32
            || !matches!(w.device(), Device::Cpu)
            || !has_v3()
        {
            return Ok(None);
        }
        let rows = w.contiguous()?.to_vec2::<f32>()?;
        let panels = out.div_ceil(PANEL);
        let mut data = vec![0f32; panels * k * PANEL];
        data.par_chunks_mut(k * PANEL)
            .enumerate()
            .for_each(|(p, panel)| {
                for (c, row) in rows[p * PANEL..out.min((p + 1) * PANEL)].iter().enumerate() {
                    for (i, &v) in row.iter().enumerate() {
                        panel[i * PANEL + c] = v;
                    }
                }
            });
        let amx = (products == F32Products::Amx && crate::amx::available())
            .then(|| crate::amx::Tiles::new(&data, k));
        Ok(Some(Self { data, amx, out, k }))
    }

    /// Activation rows up to which the serving forward multiplies by this packed copy
    /// (longer prefill chunks go to candle's gemm): all of them with AMX tiles.
    pub fn max_rows(&self) -> usize {
        if self.takes_every_row() {
            usize::MAX
        } else {
            max_rows()
        }
    }

    /// Whether this copy serves every row count (it has AMX tiles), so the float weight it
    /// was packed from is no longer multiplied.
    pub fn takes_every_row(&self) -> bool {
        self.amx.is_some()
    }

    /// Bytes the packed copies take.
    pub fn bytes(&self) -> u64 {
        (self.data.len() * 4) as u64 + self.amx.as_ref().map_or(0, |t| t.bytes())
    }

    /// `x [n, in] · wᵀ` → `[n, out]`: on AMX ([`crate::amx`]) from [`crate::amx::MIN_ROWS`]
    /// rows where the CPU has it, on this module's FMA kernels otherwise.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        match x.dims2() {
            Ok((n, xk)) if xk == self.k && self.amx.is_some() && n >= crate::amx::MIN_ROWS => {
                self.matmul_t_amx(x)
            }
            _ => self.matmul_t_fma(x),
        }
    }

    /// [`Self::matmul_t`] on AMX whatever the number of rows; only where
    /// [`crate::amx::available`].
    pub fn matmul_t_amx(&self, x: &Tensor) -> Result<Tensor> {
        let mut ys = Self::matmul_t_amx_many(&[self], x)?;
        Ok(ys.pop().expect("one product for one weight"))
    }

    /// `x [n, in] · wᵀ` for each of several weights with the same input width: on AMX in one
    /// pass ([`crate::amx`]; the rows are split into bf16 halves once for all of them) from
    /// [`crate::amx::MIN_ROWS`] rows where every weight has tiles, each on its own
    /// [`Self::matmul_t`] otherwise. Each result equals that weight's `matmul_t`.
    pub fn matmul_t_many(weights: &[&PackedWeight], x: &Tensor) -> Result<Vec<Tensor>> {
        match x.dims2() {
            Ok((n, xk))
                if n >= crate::amx::MIN_ROWS
                    && weights.iter().all(|w| w.amx.is_some() && w.k == xk) =>
            {
                Self::matmul_t_amx_many(weights, x)
            }
            Ok((n, xk)) if n >= 2 && weights.iter().all(|w| w.k == xk) => {
                Self::matmul_t_fma_many(weights, x)
            }
            _ => weights.iter().map(|w| w.matmul_t(x)).collect(),
        }
    }

    /// [`Self::matmul_t_many`] on AMX whatever the number of rows.
    fn matmul_t_amx_many(weights: &[&PackedWeight], x: &Tensor) -> Result<Vec<Tensor>> {
        let (n, xk) = x.dims2()?;
        let mut tiles = Vec::with_capacity(weights.len());
        for w in weights {
            let Some(t) = &w.amx else {
                return Err(ModelError::input("x", "no AMX on this CPU"));
            };
            if xk != w.k {
                return Err(ModelError::input(
                    "x",
                    format!("packed weight takes {} inputs, got {xk}", w.k),
                ));
            }
            tiles.push((t, w.out));
        }
        with_rows(x, |xs| crate::amx::Tiles::products(&tiles, xs, n, xk))?
    }

    /// [`Self::matmul_t`] on the FMA kernels whatever the number of rows.
    pub fn matmul_t_fma(&self, x: &Tensor) -> Result<Tensor> {
        if x.dims2().is_ok_and(|(n, _)| n >= 2) {
            let mut ys = Self::matmul_t_fma_many(&[self], x)?;
            return Ok(ys.pop().expect("one product for one weight"));
        }
        let k = self.k;
        panel_product(x, k, self.out, "packed weight", |xs, n, res| {
            debug_assert!(n == 1);
            // An even split: rounding a one-row task up to whole four-panel blocks left one
            // thread idle on the 3- and 9-panel products (small batch-1 decode 36 -> 28 tok/s).
            let per_task = panels_per_task(res.len() / PANEL);
            let arch = pulp::Arch::new();
            self.data
                .par_chunks(per_task * k * PANEL)
                .zip(res.par_chunks_mut(per_task * PANEL))
                .for_each(|(panels, out)| {
                    arch.dispatch(OneRow {
                        panels,
                        x: &xs[..k],
                        out,
                    })
                });
        })
    }

    /// [`Self::matmul_t_many`] on the FMA kernels, in one pass ([`multiply_rows`]); a result
    /// whose width ends in a partial panel is a view of the padded product's first columns.
    fn matmul_t_fma_many(weights: &[&PackedWeight], x: &Tensor) -> Result<Vec<Tensor>> {
        let (n, xk) = x.dims2()?;
        if let Some(w) = weights.iter().find(|w| w.k != xk) {
            return Err(ModelError::input(
                "x",
                format!("packed weight takes {} inputs, got {xk}", w.k),
            ));
        }
        if n == 0 {
            return weights
                .iter()
                .map(|w| Ok(Tensor::zeros((0, w.out), DType::F32, &Device::Cpu)?))
                .collect();
        }
        let results = with_rows(x, |xs| multiply_rows(weights, xs, n, xk))?;
        results
            .into_iter()
            .zip(weights)
            .map(|(res, w)| {
                let width = res.len() / n;
                let t = Tensor::from_vec(res, (n, width), &Device::Cpu)?;
                Ok(if width == w.out {
                    t
                } else {
                    t.narrow(1, 0, w.out)?
                })
            })
            .collect()
    }
}

/// `f` of `x`'s rows as one f32 slice: a contiguous f32 CPU tensor is read in place, anything
/// else is copied once.
pub(crate) fn with_rows<T>(x: &Tensor, f: impl FnOnce(&[f32]) -> T) -> Result<T> {
    use candle_core::Storage;
    {
        let (storage, layout) = x.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets())
            && let Ok(xs) = cpu.as_slice::<f32>()
        {
            return Ok(f(&xs[start..end]));
        }
    }
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(f(&xs))
}

/// Panels per rayon task: one contiguous, even share each.
pub(crate) fn panels_per_task(panels: usize) -> usize {
    panels.div_ceil(rayon::current_num_threads().max(1))
}

/// The frame of a panel product `x [n, k] · wᵀ` → `[n, out]` (f32 or q8_0 panels): checks
/// `x`'s width (`what` names the weight in the error), hands `fill` its rows as f32, `n` and
/// a zeroed `[panels, n, PANEL]` result, and returns that as `[n, out]`.
pub(crate) fn panel_product(
    x: &Tensor,
    k: usize,
    out: usize,
    what: &str,
    fill: impl FnOnce(&[f32], usize, &mut [f32]),
) -> Result<Tensor> {
    let (n, xk) = x.dims2()?;
    if xk != k {
        return Err(ModelError::input(
            "x",
            format!("{what} takes {k} inputs, got {xk}"),
        ));
    }
    if n == 0 {
        return Ok(Tensor::zeros((0, out), DType::F32, &Device::Cpu)?);
    }
    let panels = out.div_ceil(PANEL);
    let mut res = vec![0f32; panels * n * PANEL];
    with_rows(x, |xs| fill(xs, n, &mut res))?;
    let t = Tensor::from_vec(res, (panels, n, PANEL), &Device::Cpu)?;
    let t = if n == 1 {
        t.reshape((1, panels * PANEL))?
    } else {
        t.transpose(0, 1)?
            .contiguous()?
            .reshape((n, panels * PANEL))?
    };
    Ok(if panels * PANEL == out {
        t
    } else {
        t.narrow(1, 0, out)?.contiguous()?
    })
}

impl Model {
    /// Pack every f32 CPU projection and the LM head for serving (see the module docs);
    /// returns the bytes the packed copies take. A q8_0 model is left as it is (its float
    /// leftovers stay on candle's matmul, see `quant`).
    ///
    /// The float weights stay for prefill chunks longer than [`max_rows`] (without AMX tiles),
    /// stored transposed
    /// (`[in, out]` in memory, still a `[out, in]` tensor): candle's gemm multiplies by a
    /// contiguous `wᵀ` without repacking it, 3–37% faster on the `small` shape's products at
    /// 128–512 rows than through the transposed view of `[out, in]` storage. The tied LM head
    /// keeps the embedding's layout (its rows are looked up). With AMX every row count runs
    /// on the packed copy and the float weights keep their layout. So a packed model serves;
    /// its weights are no longer the variables a trainer updates.
    pub fn pack_for_serving(&mut self) -> Result<u64> {
        self.pack_for_serving_with(F32Products::default_for_this_cpu())
    }

    /// [`Self::pack_for_serving`] with the given kind of f32 products.
    pub fn pack_for_serving_with(&mut self, products: F32Products) -> Result<u64> {
        let mut bytes = 0;
        if self.lm_head.quantized.is_some() || self.layers.iter().any(|l| l.q.quantized.is_some()) {
            return Ok(0);
        }
        let embed = self.embed.id();
        for p in self.projections_mut() {
            if let Some(packed) = PackedWeight::pack_with(&p.weight, products)? {
                bytes += packed.bytes();
                let all_rows = packed.takes_every_row();
                p.packed = Some(std::sync::Arc::new(packed));
                if p.weight.id() != embed && !all_rows {
                    p.weight = p.weight.t()?.contiguous()?.t()?;
                }
            }
        }
        Ok(bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Largest absolute difference of two f32 tensors.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
            .expect("same shapes")
    }

    /// Run `f` on 1 and on 2 rayon threads, so each task holds several panels (the one-row
    /// path's four-panel blocks) whatever the machine's width.
    pub(crate) fn on_narrow_pools(f: impl Fn() + Sync) {
        for threads in [1, 2] {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool")
                .install(&f);
        }
    }

    #[test]
    fn matches_candle_matmul() {
        on_narrow_pools(matches_candle_matmul_here);
    }

    fn matches_candle_matmul_here() {
        // Row counts that use every tile width, widths that leave a partial last panel,
        // inputs that leave a partial last slice of 32 (20 rows) or 64 (3 rows).
        for (n, out, k) in [
            (1, 130, 70),
            (3, 130, 70),
            (20, 70, 100),
            (15, 33, 16),
            (32, 64, 9),
            (2, 9, 16),
            (1, 4, 5),
            (40, 100, 24),
            (1, 300, 70),
            (1, 512, 33),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).expect("randn");
            let w = Tensor::randn(0f32, 1.0, (out, k), &Device::Cpu).expect("randn");
            let want = x.matmul(&w.t().expect("t")).expect("matmul");
            let packed = PackedWeight::pack(&w).expect("pack").expect("f32");
            let got = packed.matmul_t_fma(&x).expect("matmul_t");
            assert_eq!(got.dims(), &[n, out]);
            assert!(max_diff(&want, &got) < 1e-4, "n {n} out {out} k {k}");
        }
    }

    #[test]
    fn several_weights_in_one_pass_equal_each_product_alone() {
        // Odd panel counts (3, 1, 5 panels, two partial), so shares start inside a weight and
        // inside a panel's row groups; 1, 2 and 3 tasks.
        let k = 70;
        let floats: Vec<Tensor> = [130, 64, 300]
            .iter()
            .map(|&out| Tensor::randn(0f32, 1.0, (out, k), &Device::Cpu).expect("randn"))
            .collect();
        let weights: Vec<PackedWeight> = floats
            .iter()
            .map(|w| PackedWeight::pack(w).expect("pack").expect("f32"))
            .collect();
        let refs: Vec<&PackedWeight> = weights.iter().collect();
        let one_pool = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool")
        };
        for n in [0, 2, 7, 13, 32] {
            let x = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).expect("randn");
            // Alone, on one thread: one task per product, the plain order.
            let alone: Vec<Vec<Vec<f32>>> = one_pool(1).install(|| {
                refs.iter()
                    .zip(&floats)
                    .map(|(w, f)| {
                        let y = w.matmul_t_fma(&x).expect("alone");
                        let want = x.matmul(&f.t().expect("t")).expect("matmul");
                        assert!(n == 0 || max_diff(&want, &y) < 1e-4, "n {n}");
                        y.to_vec2::<f32>().expect("rows")
                    })
                    .collect()
            });
            // A strided input is copied first; the same values.
            let strided = x
                .t()
                .expect("t")
                .contiguous()
                .expect("copy")
                .t()
                .expect("t");
            for threads in [1, 2, 3] {
                for input in [&x, &strided] {
                    let together = one_pool(threads)
                        .install(|| PackedWeight::matmul_t_many(&refs, input))
                        .expect("together");
                    for ((y, w), want) in together.iter().zip(&refs).zip(&alone) {
                        assert_eq!(y.dims(), &[n, w.out]);
                        assert_eq!(&y.to_vec2::<f32>().expect("rows"), want, "n {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn shares_cover_every_unit_once_with_even_work() {
        for n in [2, 7, 32, 64] {
            let xs = vec![0f32; n];
            let groups = Groups::new(&xs, n, &[6, 4, 2, 1]);
            let g = groups.spans.len();
            for panels in [1, 3, 9, 64] {
                for tasks in [1, 2, 3, 5] {
                    let bounds = shares(&groups.spans, n, panels, tasks);
                    assert_eq!(bounds[0], 0);
                    assert_eq!(*bounds.last().expect("bounds"), panels * g);
                    assert!(bounds.windows(2).all(|b| b[0] <= b[1]));
                    // Rows × panels per share: within a group (6 rows) of an even split.
                    let rows = |unit: usize| {
                        (unit / g) * n + groups.spans.get(unit % g).map_or(n, |s| s.0)
                    };
                    let even = (panels * n) as f64 / (bounds.len() - 1) as f64;
                    for b in bounds.windows(2) {
                        let work = (rows(b[1]) - rows(b[0])) as f64;
                        assert!(
                            (work - even).abs() < 6.0,
                            "n {n} panels {panels} tasks {tasks}: {work} vs {even}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_rest_of_the_batch() {
        on_narrow_pools(a_row_does_not_depend_on_the_rest_of_the_batch_here);
    }

    fn a_row_does_not_depend_on_the_rest_of_the_batch_here() {
        // Every tile width (4, 2, 1 rows), both slice lengths (13 rows walk the 70 inputs
        // 32 at a time, fewer rows 64) and the one-row path give each row the same bits.
        let (out, k) = (300, 70);
        let w = Tensor::randn(0f32, 1.0, (out, k), &Device::Cpu).expect("randn");
        let packed = PackedWeight::pack(&w).expect("pack").expect("f32");
        let x = Tensor::randn(0f32, 1.0, (13, k), &Device::Cpu).expect("randn");
        let all = packed
            .matmul_t_fma(&x)
            .expect("batch")
            .to_vec2::<f32>()
            .expect("rows");
        for n in [1, 2, 3, 5, 13] {
            let part = packed
                .matmul_t_fma(&x.narrow(0, 0, n).expect("rows"))
                .expect("part")
                .to_vec2::<f32>()
                .expect("rows");
            assert_eq!(part[..], all[..n], "{n} rows");
        }
    }
}
