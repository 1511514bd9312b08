//! Serving weights packed into panels for the CPU's matrix products of a decode step.
//!
//! `x [n, in] · wᵀ` with few activation rows is bound by reading the weight once. A general
//! GEMM packs the weight into panels on every call, which costs more than the product itself
//! at these sizes. [`PackedWeight`] packs it once, at model load: panels of [`PANEL`] output
//! rows, stored input-position-major, so one step of the inner loop loads `PANEL` weights as
//! whole vectors and multiplies them by one broadcast activation per row (an outer product,
//! as in GEMM micro-kernels: no horizontal sums). A tile keeps `PANEL × R` accumulators in
//! registers (`R` up to 6 rows with AVX-512, 1 with AVX2). Panels are walked `KC` input
//! positions at a time so that slice stays in L1 for every group of rows (the next slice is
//! prefetched into L2 meanwhile), and split into one contiguous range per rayon thread. The
//! loops are plain Rust compiled for the best instruction set the CPU has at run time (`pulp`
//! dispatch). CPUs without AVX2 (and non-x86 ones) keep candle's matmul:
//! [`PackedWeight::pack`] declines there.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::{ModelError, Result};
use crate::model::Model;

/// Output rows per panel: four AVX-512 or eight AVX2 vectors.
pub const PANEL: usize = 64;

/// Activation rows up to which the serving forward uses the packed weight with AVX-512
/// ([`max_rows`]). Measured on the `small` shape's products (2 threads,
/// `examples/packed_vs_gemm.rs`): at 16 rows the packed product takes 0.22 / 0.21 / 6.9 ms
/// (576→1536, 1536→576, the 576→49152 LM head) against candle's gemm at 0.52 / 1.15 / 15.4
/// ms; at 64 rows 0.54 / 0.56 / 26.8 against 0.78 / 1.43 / 27.6; at 256 rows (prefill)
/// candle's is faster on most.
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

/// Multiply `KC` (or fewer) input positions of a panel by the `R` activation rows of `xt`
/// (interleaved: `xt[i·R + r]` is row `r`'s input `i`), adding into `acc` (row `r`'s sums at
/// `acc[r·V..]`): one load of each weight vector and one broadcast per row for every input
/// position, no horizontal sums. With AVX-512 a panel is 4 vectors, so even one row has 4
/// independent FMA chains, and 6 rows keep 24 accumulators in registers (10 loads per 24
/// FMAs). Every output is summed in input order whatever `R` is: up to [`max_rows`] rows, a
/// row's product does not depend on what else is in the batch (larger batches go through
/// candle's gemm; attention of a lone decode token differs from a group's).
#[inline(always)]
fn tile<S: pulp::Simd, const V: usize, const R: usize>(
    simd: S,
    panel: &[S::f32s],
    xt: &[f32],
    acc: &mut [S::f32s],
) {
    let mut sums: [[S::f32s; V]; R] = std::array::from_fn(|r| {
        let a = &acc[r * V..(r + 1) * V];
        std::array::from_fn(|v| a[v])
    });
    for (w, x) in panel.chunks_exact(V).zip(xt.chunks_exact(R)) {
        let w: [S::f32s; V] = std::array::from_fn(|v| w[v]);
        for (sums, &x) in sums.iter_mut().zip(x) {
            let b = simd.splat_f32s(x);
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
fn prefetch_l2<T>(data: Option<&[T]>) {
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

/// Activation rows in tile groups (`R` rows each, interleaved by input position), so every
/// tile reads its rows as one contiguous stream.
struct Groups {
    /// `(first row, rows, offset into data)` per group.
    spans: Vec<(usize, usize, usize)>,
    data: Vec<f32>,
}

impl Groups {
    fn new(xs: &[f32], n: usize, k: usize, widths: &[usize]) -> Self {
        let mut spans = Vec::new();
        let mut data = Vec::with_capacity(n * k);
        let mut r0 = 0;
        while r0 < n {
            let r = *widths
                .iter()
                .find(|&&w| w <= n - r0)
                .expect("widths end with 1");
            spans.push((r0, r, data.len()));
            for i in 0..k {
                data.extend((r0..r0 + r).map(|row| xs[row * k + i]));
            }
            r0 += r;
        }
        Self { spans, data }
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

/// One task's panels (`panels`, and `out` of `panels / (k·PANEL)` blocks of `[n, PANEL]`)
/// times every activation row.
struct Panels<'a> {
    panels: &'a [f32],
    groups: &'a Groups,
    /// The activation rows as given, `[n, k]` (for the scalar path).
    xs: &'a [f32],
    k: usize,
    n: usize,
    out: &'a mut [f32],
}

impl Panels<'_> {
    /// One activation row (a lone decode step): `P` panels at a time, so the weight is read
    /// as `P` concurrent streams (one sequential stream leaves memory bandwidth unused), each
    /// output summed in input order as [`tile`] does.
    #[inline(always)]
    fn run_one_row<S: pulp::Simd, const V: usize, const P: usize>(self, simd: S) {
        let Panels {
            panels, xs, k, out, ..
        } = self;
        let (vecs, _) = S::as_simd_f32s(panels);
        let mut blocks = vecs.chunks_exact(P * k * V);
        let mut dsts = out.chunks_exact_mut(P * PANEL);
        for (w, dst) in (&mut blocks).zip(&mut dsts) {
            one_row_block::<S, V, P>(simd, w, &xs[..k], dst);
        }
        for (w, dst) in blocks
            .remainder()
            .chunks_exact(k * V)
            .zip(dsts.into_remainder().chunks_exact_mut(PANEL))
        {
            one_row_block::<S, V, 1>(simd, w, &xs[..k], dst);
        }
    }

    #[inline(always)]
    fn run<S: pulp::Simd, const V: usize>(self, simd: S) {
        assert_eq!(V * S::F32_LANES, PANEL);
        if self.n == 1 {
            // Four panels' 16 accumulators fit AVX-512's registers, not AVX2's.
            return if V <= 4 {
                self.run_one_row::<S, V, 4>(simd)
            } else {
                self.run_one_row::<S, V, 1>(simd)
            };
        }
        let Panels {
            panels,
            groups,
            k,
            n,
            out,
            ..
        } = self;
        let (vecs, _) = S::as_simd_f32s(panels);
        let zero = simd.splat_f32s(0.0);
        let mut acc = vec![zero; n * V];
        for (j, (panel, out)) in vecs
            .chunks_exact(k * V)
            .zip(out.chunks_exact_mut(n * PANEL))
            .enumerate()
        {
            let base = j * k * V;
            acc.fill(zero);
            let spans = groups.spans.len();
            for c0 in (0..k).step_by(KC) {
                let c1 = (c0 + KC).min(k);
                let pw = &panel[c0 * V..c1 * V];
                // The next pass's slice (the next panel's first after the last), a share per
                // group, so it arrives from memory while this one is multiplied.
                let next =
                    &vecs[(base + c1 * V).min(vecs.len())..(base + (c1 + KC) * V).min(vecs.len())];
                let share = next.len().div_ceil(spans).max(1);
                for (g, &(r0, r, at)) in groups.spans.iter().enumerate() {
                    prefetch_l2(next.get(g * share..((g + 1) * share).min(next.len())));
                    let xt = &groups.data[at + c0 * r..at + c1 * r];
                    let acc = &mut acc[r0 * V..(r0 + r) * V];
                    match r {
                        6 => tile::<S, V, 6>(simd, pw, xt, acc),
                        4 => tile::<S, V, 4>(simd, pw, xt, acc),
                        2 => tile::<S, V, 2>(simd, pw, xt, acc),
                        _ => tile::<S, V, 1>(simd, pw, xt, acc),
                    }
                }
            }
            for (sums, dst) in acc.chunks_exact(V).zip(out.chunks_exact_mut(PANEL)) {
                S::as_mut_simd_f32s(dst).0[..V].copy_from_slice(sums);
            }
        }
    }

    /// Without 256-bit vectors (not reached: [`PackedWeight::pack`] declines there): one dot
    /// product at a time, in input order (unfused, so not [`tile`]'s bits).
    fn run_scalar(self) {
        let (k, n) = (self.k, self.n);
        for (panel, out) in self
            .panels
            .chunks_exact(k * PANEL)
            .zip(self.out.chunks_exact_mut(n * PANEL))
        {
            for (x, row) in self.xs.chunks_exact(k).zip(out.chunks_exact_mut(PANEL)) {
                for (c, d) in row.iter_mut().enumerate() {
                    *d = (0..k).map(|i| panel[i * PANEL + c] * x[i]).sum();
                }
            }
        }
    }
}

impl pulp::WithSimd for Panels<'_> {
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

/// Tile widths (activation rows per tile) for the CPU's vectors: the `PANEL × R`
/// accumulators must fit the register file (24 of AVX-512's 32 registers at `R` = 6, 8 of
/// AVX2's 16 at `R` = 1).
fn tile_widths() -> &'static [usize] {
    if has_v4() { &[6, 4, 2, 1] } else { &[1] }
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
            _ => weights.iter().map(|w| w.matmul_t(x)).collect(),
        }
    }

    /// [`Self::matmul_t_many`] on AMX whatever the number of rows.
    fn matmul_t_amx_many(weights: &[&PackedWeight], x: &Tensor) -> Result<Vec<Tensor>> {
        use candle_core::Storage;
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
        // A contiguous f32 CPU input is read in place; anything else is copied once.
        let (storage, layout) = x.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets())
            && let Ok(xs) = cpu.as_slice::<f32>()
        {
            return crate::amx::Tiles::products(&tiles, &xs[start..end], n, xk);
        }
        drop(storage);
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        crate::amx::Tiles::products(&tiles, &xs, n, xk)
    }

    /// [`Self::matmul_t`] on the FMA kernels whatever the number of rows.
    pub fn matmul_t_fma(&self, x: &Tensor) -> Result<Tensor> {
        let k = self.k;
        panel_product(x, k, self.out, "packed weight", |xs, n, res| {
            let groups = Groups::new(xs, n, k, tile_widths());
            // An even split: rounding a one-row task up to whole four-panel blocks left one
            // thread idle on the 3- and 9-panel products (small batch-1 decode 36 -> 28 tok/s).
            let per_task = panels_per_task(res.len() / (n * PANEL));
            let arch = pulp::Arch::new();
            self.data
                .par_chunks(per_task * k * PANEL)
                .zip(res.par_chunks_mut(per_task * n * PANEL))
                .for_each(|(panels, out)| {
                    arch.dispatch(Panels {
                        panels,
                        groups: &groups,
                        xs,
                        k,
                        n,
                        out,
                    })
                });
        })
    }
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
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let panels = out.div_ceil(PANEL);
    let mut res = vec![0f32; panels * n * PANEL];
    fill(&xs, n, &mut res);
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
        // Row counts that use every tile width, widths that leave a partial last panel.
        for (n, out, k) in [
            (1, 130, 70),
            (3, 130, 70),
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
    fn a_row_does_not_depend_on_the_rest_of_the_batch() {
        on_narrow_pools(a_row_does_not_depend_on_the_rest_of_the_batch_here);
    }

    fn a_row_does_not_depend_on_the_rest_of_the_batch_here() {
        // Every tile width (6, 4, 2, 1 rows) and the one-row path give each row the same bits.
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
