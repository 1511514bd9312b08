//! q8_0 serving weights packed for AVX-512 VNNI integer dot products.
//!
//! The same numbers as ggml's (and candle's) q8_0 matmul, laid out for the CPU instead of for
//! the file: a weight row's every 32 inputs share one f16 scale `d` and store `round(w / d)`
//! in `[-127, 127]`; each activation row is quantized the same way when the product runs, and
//! `y = Σ_blocks d_w · d_x · Σ_j q_w[j] · q_x[j]` with the inner sums in exact integers.
//!
//! candle's q8_0 product walks one output row at a time (a dot product of 32-byte blocks with
//! horizontal sums, AVX2 at best). Here weights sit in panels of [`PANEL`] output rows, each
//! 32-input block stored as 8 four-input quads × 4 vectors of 16 rows, so one `vpdpbusd`
//! multiplies 16 output rows by 4 broadcast activation bytes and adds into 16 integer lanes:
//! no horizontal sums, 64 multiply-adds an instruction. `vpdpbusd` takes one unsigned and one
//! signed operand: the weights are stored offset by +128 (unsigned) and the activations stay
//! signed, so every sum carries `128 · Σ q_x` too, which each block's accumulators start at
//! the negative of (one value per activation row and block, found while quantizing it).
//!
//! A block is 2048 weight bytes and its 64 f16 scales (2176 bytes, 34 cache lines), so a panel
//! is one sequential stream, and every output is summed in block order whatever rows it is
//! computed with: a row's result does not depend on the rest of the batch. Only CPUs with
//! AVX-512 VNNI get this; [`PackedQ8::quantize`] declines elsewhere (candle's q8_0 matmul).

use candle_core::{DType, Device, Tensor};
use half::f16;
use rayon::prelude::*;

use crate::error::Result;

/// Output rows per panel: four vectors of sixteen 32-bit lanes.
pub const PANEL: usize = 64;
/// Inputs per q8_0 block (one scale).
pub const QK: usize = 32;
/// Cache lines per block of a panel: 32 of weights, 2 of f16 scales.
const LINES: usize = 34;
/// Blocks per pass over a panel when several row tiles share it: `BC × 2176` bytes (8.5 KiB)
/// stay in L1 while every tile multiplies them.
const BC: usize = 4;

#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A `[out, in]` weight quantized to q8_0 (`in` a multiple of [`QK`]) in panels of [`PANEL`]
/// output rows, the last padded with zero rows.
#[derive(Debug)]
pub struct PackedQ8 {
    data: Vec<Line>,
    out: usize,
    k: usize,
}

/// Whether this CPU runs the packed q8_0 products.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `round(v / d)` for a block with scale `d = max|v| / 127` (ggml's `quantize_row_q8_0`, with
/// ties rounded to even): returns the f32 scale and fills `q`.
fn quantize_block(v: &[f32], q: &mut [i8]) -> f32 {
    let amax = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    for (q, &x) in q.iter_mut().zip(v) {
        // Ties to even and clamped, as `kernel::quantize_rows` does.
        *q = (x * id).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    d
}

/// Activation rows quantized to q8_0 blocks, in the kernel's order.
struct Acts {
    /// `[n, k / 4]`: four consecutive inputs' bytes as one little-endian `i32`.
    quads: Vec<i32>,
    /// `[n, k / QK]`: each block's scale.
    scales: Vec<f32>,
    /// `[n, k / QK]`: `-128 · Σ q` of each block (the weights' +128 offset, taken back).
    starts: Vec<i32>,
    nb: usize,
}

impl Acts {
    fn new(xs: &[f32], n: usize, k: usize) -> Self {
        let nb = k / QK;
        #[cfg(target_arch = "x86_64")]
        if available() {
            let mut acts = Self {
                quads: vec![0; n * k / 4],
                scales: vec![0.0; n * nb],
                starts: vec![0; n * nb],
                nb,
            };
            // SAFETY: the features are checked just above; the buffers are sized for
            // `xs.len() / QK` blocks, as the kernel asserts.
            #[allow(unsafe_code)]
            unsafe {
                kernel::quantize_rows(xs, &mut acts)
            };
            return acts;
        }
        let mut quads = Vec::with_capacity(n * k / 4);
        let mut scales = Vec::with_capacity(n * nb);
        let mut starts = Vec::with_capacity(n * nb);
        let mut q = [0i8; QK];
        for block in xs.chunks_exact(QK) {
            scales.push(quantize_block(block, &mut q));
            starts.push(-128 * q.iter().map(|&v| i32::from(v)).sum::<i32>());
            quads.extend(
                q.chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8])),
            );
        }
        debug_assert_eq!(scales.len(), n * nb);
        Self {
            quads,
            scales,
            starts,
            nb,
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    use std::arch::x86_64::*;

    use super::{Acts, LINES, Line, PANEL};

    /// Quantize `xs` (whole blocks of [`super::QK`]) into `acts` as [`super::quantize_block`]
    /// does, 32 values at a time.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW ([`super::available`]).
    #[target_feature(enable = "avx512f,avx512bw")]
    #[allow(unsafe_code)]
    pub(super) unsafe fn quantize_rows(xs: &[f32], acts: &mut Acts) {
        let blocks = xs.len() / super::QK;
        assert!(
            acts.scales.len() == blocks
                && acts.starts.len() == blocks
                && acts.quads.len() == blocks * 8
        );
        for (((x, quads), scale), start) in xs
            .chunks_exact(super::QK)
            .zip(acts.quads.chunks_exact_mut(8))
            .zip(&mut acts.scales)
            .zip(&mut acts.starts)
        {
            // SAFETY: 32 in-bounds f32 of the block; loadu needs no alignment.
            let (a, b) = unsafe {
                (
                    _mm512_loadu_ps(x.as_ptr()),
                    _mm512_loadu_ps(x.as_ptr().add(16)),
                )
            };
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d == 0.0 { 0.0 } else { 1.0 / d });
            // To nearest, ties to even, whatever the rounding mode; clamped, so a block of
            // non-finite values (or one so small that 1/d overflows) cannot overflow the sum.
            let round = |v| {
                let q = _mm512_cvt_roundps_epi32::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    v,
                );
                _mm512_max_epi32(
                    _mm512_min_epi32(q, _mm512_set1_epi32(127)),
                    _mm512_set1_epi32(-127),
                )
            };
            let qa = round(_mm512_mul_ps(a, id));
            let qb = round(_mm512_mul_ps(b, id));
            *scale = d;
            *start = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
            // SAFETY: 32 bytes into the block's 8 in-bounds i32.
            unsafe {
                let out = quads.as_mut_ptr().cast::<__m128i>();
                _mm_storeu_si128(out, _mm512_cvtepi32_epi8(qa));
                _mm_storeu_si128(out.add(1), _mm512_cvtepi32_epi8(qb));
            }
        }
    }

    /// Blocks `b0..b1` of `P` panels (`panels[p]`: a panel's lines from block 0) times
    /// activation rows `r0..r0 + R`, added into `acc[r][p]` (each `PANEL` outputs): per block,
    /// `R × P × 4` integer accumulators take 32 `vpdpbusd` steps each, then are scaled into
    /// the float sums in block order.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F/BW/VNNI, F16C and FMA ([`super::available`]); every panel
    /// must hold `b1` blocks of [`LINES`] lines, and `acts` rows `r0..r0 + R`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,f16c,fma")]
    #[allow(unsafe_code, clippy::needless_range_loop)]
    pub(super) unsafe fn tile<const R: usize, const P: usize>(
        panels: [&[Line]; P],
        acts: &Acts,
        r0: usize,
        (b0, b1): (usize, usize),
        acc: &mut [[[f32; PANEL]; P]; R],
    ) {
        let nb = acts.nb;
        let mut sums: [[[__m512; 4]; P]; R] = std::array::from_fn(|r| {
            std::array::from_fn(|p| {
                std::array::from_fn(|v| {
                    // SAFETY: 16 in-bounds f32 of a `[f32; 64]`; loadu needs no alignment.
                    unsafe { _mm512_loadu_ps(acc[r][p][v * 16..].as_ptr()) }
                })
            })
        });
        for b in b0..b1 {
            for p in 0..P {
                assert!(panels[p].len() >= (b + 1) * LINES);
            }
            let mut isum: [[[__m512i; 4]; P]; R] = std::array::from_fn(|r| {
                [[_mm512_set1_epi32(acts.starts[(r0 + r) * nb + b]); 4]; P]
            });
            let quads: [&[i32]; R] =
                std::array::from_fn(|r| &acts.quads[((r0 + r) * nb + b) * 8..][..8]);
            for q in 0..8 {
                let x: [__m512i; R] = std::array::from_fn(|r| _mm512_set1_epi32(quads[r][q]));
                for p in 0..P {
                    let lines = panels[p][b * LINES..].as_ptr();
                    for v in 0..4 {
                        // SAFETY: line `b · LINES + 4q + v` of the panel, checked above; `Line`
                        // is 64-byte aligned.
                        let w = unsafe { _mm512_load_si512(lines.add(q * 4 + v).cast()) };
                        for r in 0..R {
                            isum[r][p][v] = _mm512_dpbusd_epi32(isum[r][p][v], w, x[r]);
                        }
                    }
                }
            }
            for p in 0..P {
                let scales = panels[p][b * LINES + 32..].as_ptr().cast::<__m256i>();
                for v in 0..4 {
                    // SAFETY: 32 bytes of the block's two scale lines (checked above), 32-byte
                    // aligned inside a 64-byte aligned line.
                    let dw = _mm512_cvtph_ps(unsafe { _mm256_load_si256(scales.add(v)) });
                    for r in 0..R {
                        let s = _mm512_mul_ps(dw, _mm512_set1_ps(acts.scales[(r0 + r) * nb + b]));
                        sums[r][p][v] =
                            _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[r][p][v]), s, sums[r][p][v]);
                    }
                }
            }
        }
        for r in 0..R {
            for p in 0..P {
                for v in 0..4 {
                    // SAFETY: 16 in-bounds f32 of a `[f32; 64]`.
                    unsafe { _mm512_storeu_ps(acc[r][p][v * 16..].as_mut_ptr(), sums[r][p][v]) };
                }
            }
        }
    }
}

/// `R` rows from `r0` times `P` panels over all blocks, written to `out` (`[P][n][PANEL]`
/// panel-major, rows `r0..` of each).
#[cfg(target_arch = "x86_64")]
fn run_tile<const R: usize, const P: usize>(
    panels: [&[Line]; P],
    acts: &Acts,
    r0: usize,
    (b0, b1): (usize, usize),
    acc: &mut [[[f32; PANEL]; P]; R],
) {
    assert!(
        available(),
        "packed q8_0 product on a CPU without AVX-512 VNNI"
    );
    assert!(acts.quads.len() / (acts.nb * 8) >= r0 + R);
    // SAFETY: the features are checked above, the panels' lengths and the rows inside the
    // kernel (and just above).
    #[allow(unsafe_code)]
    unsafe {
        kernel::tile::<R, P>(panels, acts, r0, (b0, b1), acc)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn run_tile<const R: usize, const P: usize>(
    _: [&[Line]; P],
    _: &Acts,
    _: usize,
    _: (usize, usize),
    _: &mut [[[f32; PANEL]; P]; R],
) {
    unreachable!("PackedQ8::quantize declines without AVX-512 VNNI")
}

/// One task's consecutive panels (`lines`) times all activation rows into `out`
/// (`[panels][n][PANEL]`).
fn run_panels(lines: &[Line], acts: &Acts, n: usize, out: &mut [f32]) {
    let per_panel = acts.nb * LINES;
    let panels: Vec<&[Line]> = lines.chunks_exact(per_panel).collect();
    let mut outs: Vec<&mut [f32]> = out.chunks_exact_mut(n * PANEL).collect();
    let all = (0, acts.nb);
    if n == 1 {
        // Two panels at once: two weight streams (one leaves memory bandwidth unused).
        let mut j = 0;
        while j + 2 <= panels.len() {
            let mut acc = [[[0f32; PANEL]; 2]; 1];
            run_tile::<1, 2>([panels[j], panels[j + 1]], acts, 0, all, &mut acc);
            outs[j].copy_from_slice(&acc[0][0]);
            outs[j + 1].copy_from_slice(&acc[0][1]);
            j += 2;
        }
        if j < panels.len() {
            let mut acc = [[[0f32; PANEL]; 1]; 1];
            run_tile::<1, 1>([panels[j]], acts, 0, all, &mut acc);
            outs[j].copy_from_slice(&acc[0][0]);
        }
        return;
    }
    let mut acc = vec![[[0f32; PANEL]; 1]; n];
    for (panel, out) in panels.iter().zip(outs.iter_mut()) {
        acc.iter_mut().for_each(|a| *a = [[0.0; PANEL]; 1]);
        for b0 in (0..acts.nb).step_by(BC) {
            let blocks = (b0, (b0 + BC).min(acts.nb));
            let mut r0 = 0;
            while r0 < n {
                let rows = &mut acc[r0..];
                let r = match n - r0 {
                    1 => {
                        run_tile::<1, 1>(
                            [panel],
                            acts,
                            r0,
                            blocks,
                            (&mut rows[..1]).try_into().expect("1"),
                        );
                        1
                    }
                    2 => {
                        run_tile::<2, 1>(
                            [panel],
                            acts,
                            r0,
                            blocks,
                            (&mut rows[..2]).try_into().expect("2"),
                        );
                        2
                    }
                    _ => {
                        run_tile::<3, 1>(
                            [panel],
                            acts,
                            r0,
                            blocks,
                            (&mut rows[..3]).try_into().expect("3"),
                        );
                        3
                    }
                };
                r0 += r;
            }
        }
        for (a, dst) in acc.iter().zip(out.chunks_exact_mut(PANEL)) {
            dst.copy_from_slice(&a[0]);
        }
    }
}

impl PackedQ8 {
    /// Quantize and pack a 2-D CPU weight `[out, in]`; `None` when `in` is not a multiple of
    /// [`QK`], and on CPUs without AVX-512 VNNI ([`available`]).
    pub fn quantize(w: &Tensor) -> Result<Option<Self>> {
        let Ok((out, k)) = w.dims2() else {
            return Ok(None);
        };
        if out == 0
            || k == 0
            || !k.is_multiple_of(QK)
            || !matches!(w.device(), Device::Cpu)
            || !available()
        {
            return Ok(None);
        }
        let rows = w.to_dtype(DType::F32)?.contiguous()?.to_vec2::<f32>()?;
        let nb = k / QK;
        let panels = out.div_ceil(PANEL);
        let mut data = vec![Line([0; 64]); panels * nb * LINES];
        data.par_chunks_mut(LINES)
            .enumerate()
            .for_each(|(i, block)| {
                let (p, b) = (i / nb, i % nb);
                // Zero weights (stored +128) and zero scales for the padding rows.
                for line in &mut block[..32] {
                    line.0 = [128; 64];
                }
                let mut q = [0i8; QK];
                for c in 0..PANEL.min(out - p * PANEL) {
                    let row = &rows[p * PANEL + c][b * QK..(b + 1) * QK];
                    let d = f16::from_f32(quantize_block(row, &mut q)).to_le_bytes();
                    let (v, lane) = (c / 16, c % 16);
                    for (j, &qj) in q.iter().enumerate() {
                        block[(j / 4) * 4 + v].0[lane * 4 + j % 4] = (i16::from(qj) + 128) as u8;
                    }
                    block[32 + c / 32].0[(c % 32) * 2..][..2].copy_from_slice(&d);
                }
            });
        Ok(Some(Self { data, out, k }))
    }

    /// Bytes the packed weight takes.
    pub fn bytes(&self) -> u64 {
        (self.data.len() * 64) as u64
    }

    /// `x [n, in] · wᵀ` → `[n, out]`, with `x` quantized to q8_0 blocks first.
    pub fn matmul_t(&self, x: &Tensor) -> Result<Tensor> {
        crate::packed::panel_product(x, self.k, self.out, "q8_0 weight", |xs, n, res| {
            let acts = Acts::new(xs, n, self.k);
            let per_task = crate::packed::panels_per_task(res.len() / (n * PANEL));
            self.data
                .par_chunks(per_task * acts.nb * LINES)
                .zip(res.par_chunks_mut(per_task * n * PANEL))
                .for_each(|(lines, out)| run_panels(lines, &acts, n, out));
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::tests::{max_diff, on_narrow_pools};

    /// Whether the packed products can run here; says so when not.
    fn vnni() -> bool {
        let here = available();
        if !here {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
        }
        here
    }

    /// The q8_0 product in plain scalar code: both sides quantized per 32-block, dot
    /// products in integers, scaled and summed in f64.
    fn reference(x: &[Vec<f32>], w: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let quant = |v: &[f32]| -> Vec<(f32, [i8; QK])> {
            v.chunks_exact(QK)
                .map(|b| {
                    let mut q = [0i8; QK];
                    let d = quantize_block(b, &mut q);
                    (d, q)
                })
                .collect()
        };
        let wq: Vec<_> = w
            .iter()
            .map(|row| {
                quant(row)
                    .into_iter()
                    .map(|(d, q)| (f16::from_f32(d).to_f32(), q))
                    .collect::<Vec<_>>()
            })
            .collect();
        x.iter()
            .map(|xr| {
                let xq = quant(xr);
                wq.iter()
                    .map(|wr| {
                        wr.iter()
                            .zip(&xq)
                            .map(|((dw, qw), (dx, qx))| {
                                let dot: i32 = qw
                                    .iter()
                                    .zip(qx)
                                    .map(|(&a, &b)| i32::from(a) * i32::from(b))
                                    .sum();
                                f64::from(*dw) * f64::from(*dx) * f64::from(dot)
                            })
                            .sum::<f64>() as f32
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn matches_the_scalar_q8_0_product() {
        if !vnni() {
            return;
        }
        on_narrow_pools(|| {
            // Row counts for every tile (1, 2, 3 and mixes), partial last panels, odd panel
            // counts (the one-row path's pairs and their remainder), block chunks.
            for (n, out, k) in [
                (1, 64, 32),
                (1, 130, 64),
                (1, 300, 160),
                (2, 100, 96),
                (3, 64, 32),
                (7, 200, 192),
                (16, 129, 576),
            ] {
                let x = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).expect("randn");
                let w = Tensor::randn(0f32, 0.1, (out, k), &Device::Cpu).expect("randn");
                let want = reference(
                    &x.to_vec2::<f32>().expect("x"),
                    &w.to_vec2::<f32>().expect("w"),
                );
                let packed = PackedQ8::quantize(&w).expect("pack").expect("vnni");
                let got = packed
                    .matmul_t(&x)
                    .expect("matmul")
                    .to_vec2::<f32>()
                    .expect("y");
                for (gr, wr) in got.iter().zip(&want) {
                    assert_eq!(gr.len(), out);
                    for (g, w) in gr.iter().zip(wr) {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "n {n} out {out} k {k}: {g} vs {w}"
                        );
                    }
                }
                // And near the float product: q8_0's error, not a wrong layout.
                let exact = x.matmul(&w.t().expect("t")).expect("matmul");
                let err = max_diff(&exact, &Tensor::new(got, &Device::Cpu).expect("t"));
                assert!(
                    err < 0.05 * (k as f32 / 32.0).sqrt(),
                    "n {n} k {k}: error {err}"
                );
            }
        });
    }

    #[test]
    fn a_row_does_not_depend_on_the_rest_of_the_batch() {
        if !vnni() {
            return;
        }
        on_narrow_pools(|| {
            let w = Tensor::randn(0f32, 1.0, (300, 160), &Device::Cpu).expect("randn");
            let packed = PackedQ8::quantize(&w).expect("pack").expect("vnni");
            let x = Tensor::randn(0f32, 1.0, (13, 160), &Device::Cpu).expect("randn");
            let all = packed
                .matmul_t(&x)
                .expect("all")
                .to_vec2::<f32>()
                .expect("rows");
            for n in [1, 2, 3, 5, 13] {
                let part = packed
                    .matmul_t(&x.narrow(0, 0, n).expect("rows"))
                    .expect("part")
                    .to_vec2::<f32>()
                    .expect("rows");
                assert_eq!(part[..], all[..n], "{n} rows");
            }
        });
    }

    #[test]
    fn tiny_and_non_finite_activations_do_not_overflow() {
        if !vnni() {
            return;
        }
        let w = Tensor::randn(0f32, 1.0, (64, 64), &Device::Cpu).expect("randn");
        let packed = PackedQ8::quantize(&w).expect("pack").expect("vnni");
        // A block whose scale's inverse overflows to infinity, and one with an infinity among
        // finite values: the integer sum used to overflow (a panic with overflow checks).
        let mut rows = vec![1e-38f32; 32];
        rows.push(f32::INFINITY);
        rows.extend(vec![0.25f32; 31]);
        rows.extend(vec![0.5f32; 64]);
        let x = Tensor::from_vec(rows, (2, 64), &Device::Cpu).expect("x");
        let y = packed
            .matmul_t(&x)
            .expect("matmul")
            .to_vec2::<f32>()
            .expect("y");
        // The finite row is untouched by the other.
        let alone = packed
            .matmul_t(&x.narrow(0, 1, 1).expect("row"))
            .expect("matmul")
            .to_vec2::<f32>()
            .expect("y");
        assert_eq!(y[1], alone[0]);
    }

    #[test]
    fn refuses_what_it_cannot_pack() {
        let odd = Tensor::zeros((8, 33), DType::F32, &Device::Cpu).expect("zeros");
        assert!(PackedQ8::quantize(&odd).expect("quantize").is_none());
        if let Some(p) =
            PackedQ8::quantize(&Tensor::zeros((8, 64), DType::F32, &Device::Cpu).expect("z"))
                .expect("q")
        {
            let err = p
                .matmul_t(&Tensor::zeros((1, 32), DType::F32, &Device::Cpu).expect("z"))
                .expect_err("width");
            assert!(err.to_string().contains('x'), "{err}");
        }
    }
}
