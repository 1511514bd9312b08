//! f32 serving products on Intel AMX tiles, each f32 split into two bf16 halves (bf16x3).
//!
//! AMX multiplies 16 × 32 bf16 tiles into 16 × 16 f32 accumulators in one instruction
//! (`tdpbf16ps`), several times the f32 FMA rate of AVX-512. bf16 alone keeps 8 bits of an
//! f32's 24, too few for f32 serving, so each value is split: `hi = bf16(v)` (rounded to
//! nearest even) and `lo = bf16(v - hi)`, which together keep 16 bits (relative error about
//! 2⁻¹⁷). A product is then `hi·hi + lo·hi + hi·lo` (the `lo·lo` term, about 2⁻¹⁸ of it, is
//! dropped) with every partial product exact (AMX flushes subnormal halves to zero; finite
//! values from ~3.4e38 round to an infinite `hi`) and the sums in f32: a few times 2⁻¹⁷ relative
//! error per weight × activation product, against 2⁻²⁴ for f32 (bf16 serving, as vLLM and TGI
//! do on GPUs, has 2⁻⁹). The tests here measure it against f64.
//!
//! A [`crate::packed::PackedWeight`] keeps its f32 panels for products of fewer than
//! [`MIN_ROWS`] rows (bound by reading the weight; its exact FMA kernels stream it faster)
//! and a copy converted at load into AMX [`Tiles`]: every 32-input step of a panel one
//! 8 KiB run of its four 16-column tiles' `hi` and `lo` halves, in the pair-interleaved
//! order `tdpbf16ps` reads (converting on every product cost more than it saved). Each task
//! walks its panels in groups that stay in L2 while every row tile multiplies them. The
//! activation rows are split once a product. A tile of 16 (or fewer) activation rows
//! keeps its four 16 × 16 accumulators in tile registers for a whole panel and stores them
//! straight into the `[n, out]` result. Every output is summed in input order by the same
//! instructions whatever the number of rows, so from [`MIN_ROWS`] rows up a row's result
//! does not depend on the rest of the batch (below, the FMA kernels' exact f32 sums).
//!
//! Linux grants a process the AMX state on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`);
//! [`available`] asks once. `LMFORGE_AMX=0` turns AMX off (all rows on the FMA kernels).

use std::sync::OnceLock;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Output rows per panel: four 16-column accumulator tiles.
pub const PANEL: usize = crate::packed::PANEL;
/// Inputs per step: one tile row holds 16 pairs of bf16.
const KS: usize = 32;
/// 64-byte lines per tile (16 rows of 64 bytes).
const TILE_LINES: usize = 16;
/// Lines per step of a panel: four column tiles, `hi` and `lo` each.
const STEP_LINES: usize = 8 * TILE_LINES;
/// Activation rows per tile.
const ROWS: usize = 16;

#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Line([u16; 32]);

/// Whether this process runs f32 serving products on AMX: the CPU has AMX-TILE and
/// AMX-BF16, Linux granted the tile state, and `LMFORGE_AMX` is not `0`.
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var("LMFORGE_AMX").map_or(true, |v| v.trim() != "0") && kernel::enable()
    })
}

/// `v` rounded to the nearest bf16, ties to even (as bits); a NaN becomes the quiet NaN.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return 0x7fc0;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `v` as `hi + lo`, both bf16 (bits).
#[inline(always)]
fn split(v: f32) -> (u16, u16) {
    let hi = bf16_bits(v);
    let lo = bf16_bits(v - f32::from_bits(u32::from(hi) << 16));
    (hi, lo)
}

/// Activation rows from which [`crate::packed::PackedWeight`] multiplies on AMX. Measured
/// on the `small` shape's decode steps (2 threads, `examples/decode_steps.rs`, alternating
/// runs): AMX is 15–25% faster at 4 rows and 1.2–1.3× at 8–16, level at 6, slower at 1–2
/// (there the product only streams the weight, which the FMA kernels do at a higher rate).
pub const MIN_ROWS: usize = 4;

/// Bytes of tiles a task multiplies every row tile by before moving on, so they stay in L2.
const GROUP_BYTES: usize = 1 << 20;

/// A weight's [`crate::packed`] panels converted into AMX tiles (see the module docs).
#[derive(Debug)]
pub(crate) struct Tiles {
    data: Vec<Line>,
    steps: usize,
}

impl Tiles {
    /// Convert `[out / PANEL (rounded up), k, PANEL]` f32 panels; only where [`available`].
    pub(crate) fn new(panels: &[f32], k: usize) -> Self {
        assert!(available(), "AMX tiles need AMX");
        let steps = k.div_ceil(KS);
        let mut data = vec![Line([0; 32]); panels.len() / (k * PANEL) * steps * STEP_LINES];
        data.par_chunks_mut(steps * STEP_LINES)
            .zip(panels.par_chunks(k * PANEL))
            .for_each(|(tiles, panel)| kernel::convert_panel(panel, k, tiles));
        Self { data, steps }
    }

    /// Bytes the tiles take.
    pub(crate) fn bytes(&self) -> u64 {
        (self.data.len() * 64) as u64
    }

    /// `xs [n, k] · wᵀ` → `[n, out]` for each of several weights of `k` inputs (`(tiles,
    /// out)`): the activation rows are split once, and one parallel pass shares the panels of
    /// all the weights out among the rayon tasks (a layer's q, k and v, or gate and up, read
    /// the same activations). Each result is the same as that weight's product alone; when
    /// `out` ends in a partial panel it is a view of the first `out` columns of the padded
    /// product (not contiguous).
    pub(crate) fn products(
        weights: &[(&Tiles, usize)],
        xs: &[f32],
        n: usize,
        k: usize,
    ) -> Result<Vec<Tensor>> {
        let steps = k.div_ceil(KS);
        assert!(weights.iter().all(|(t, _)| t.steps == steps));
        assert_eq!(xs.len(), n * k);
        let acts = Acts::new(xs, n, k, steps);
        let data: Vec<&[Line]> = weights.iter().map(|(t, _)| &t.data[..]).collect();
        let results = kernel::multiply(&acts, &data, steps);
        results
            .into_iter()
            .zip(weights)
            .map(|(res, &(tiles, out))| {
                let width = tiles.data.len() / (steps * STEP_LINES) * PANEL;
                let t = Tensor::from_vec(res, (n, width), &Device::Cpu)?;
                Ok(if width == out {
                    t
                } else {
                    // A view of the first `out` columns: the gate's consumer reads it in
                    // place, anything needing contiguous rows copies it.
                    t.narrow(1, 0, out)?
                })
            })
            .collect()
    }
}

/// Activation rows split into bf16 halves, `[n, steps · 32]` each, zero-padded past `in`.
struct Acts {
    hi: Vec<u16>,
    lo: Vec<u16>,
    n: usize,
    width: usize,
}

impl Acts {
    fn new(xs: &[f32], n: usize, k: usize, steps: usize) -> Self {
        let width = steps * KS;
        let mut hi = vec![0u16; n * width];
        let mut lo = vec![0u16; n * width];
        let fill = |(hi, lo, xs): (&mut [u16], &mut [u16], &[f32])| {
            for ((hi, lo), xs) in hi
                .chunks_exact_mut(width)
                .zip(lo.chunks_exact_mut(width))
                .zip(xs.chunks_exact(k))
            {
                kernel::split_row(xs, &mut hi[..k], &mut lo[..k]);
            }
        };
        // Decode rows are split on the calling thread: a rayon round trip costs more.
        let rows_per_task = (1usize << 15).div_ceil(width).max(1);
        if n <= rows_per_task {
            fill((&mut hi, &mut lo, xs));
        } else {
            hi.par_chunks_mut(rows_per_task * width)
                .zip(lo.par_chunks_mut(rows_per_task * width))
                .zip(xs.par_chunks(rows_per_task * k))
                .for_each(|((hi, lo), xs)| fill((hi, lo, xs)));
        }
        Self { hi, lo, n, width }
    }
}

#[cfg(target_arch = "x86_64")]
mod kernel {
    #![allow(unsafe_code)]
    use std::arch::asm;
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{Acts, Line, PANEL, ROWS, STEP_LINES};
    use crate::packed::{Out, Results};

    /// `asm!` with every tile register (tmm0–7) declared clobbered, and the given options.
    macro_rules! asm_on_tiles {
        ([$($option:ident),*] $($args:tt)*) => {
            asm!(
                $($args)*,
                out("tmm0") _,
                out("tmm1") _,
                out("tmm2") _,
                out("tmm3") _,
                out("tmm4") _,
                out("tmm5") _,
                out("tmm6") _,
                out("tmm7") _,
                options($($option),*)
            )
        };
    }

    /// Ask Linux for the AMX tile state, if CPUID has AMX-TILE and AMX-BF16.
    pub(super) fn enable() -> bool {
        // The conversions here are compiled for AVX-512F, which an OS or hypervisor can turn
        // off on a CPU that has AMX.
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return false;
        }
        // SAFETY: CPUID leaf 7 exists wherever AVX-512F does.
        #[allow(unused_unsafe)]
        let leaf7 = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
        if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
            return false;
        }
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: `arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)` only changes which state the
        // kernel lets this process use; it reads no memory. The syscall clobbers rcx, r11.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack)
            );
        }
        ret == 0
    }

    /// The tile configuration for tiles of `rows` activation rows: tmm0–3 accumulators and
    /// tmm4–5 activations (`rows` × 64 bytes), tmm6–7 weights (16 × 64 bytes).
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    impl Config {
        fn new(rows: usize) -> Self {
            let mut c = [0u8; 64];
            c[0] = 1; // palette 1
            for t in 0..8 {
                c[16 + 2 * t] = 64; // bytes per row
                c[48 + t] = if t >= 6 { 16 } else { rows as u8 };
            }
            Self(c)
        }
    }

    /// `acts · wᵀ` for each weight's tiles in `weights` (panels of `steps` steps): the
    /// `[n, panels · PANEL]` results. The panels of all the weights, in order, are split into
    /// one contiguous, even share per rayon task, each walked in groups that stay in L2 while
    /// every row tile multiplies them.
    pub(super) fn multiply(acts: &Acts, weights: &[&[Line]], steps: usize) -> Vec<Vec<f32>> {
        let panel_lines = steps * STEP_LINES;
        let counts: Vec<usize> = weights.iter().map(|d| d.len() / panel_lines).collect();
        let total: usize = counts.iter().sum();
        let per_task = crate::packed::panels_per_task(total).max(1);
        let group = (super::GROUP_BYTES / (panel_lines * 64)).clamp(1, per_task);
        let results = Results::new(acts.n, &counts);
        (0..total.div_ceil(per_task)).into_par_iter().for_each(|t| {
            let (first, end) = (t * per_task, ((t + 1) * per_task).min(total));
            let mut base = 0;
            for ((data, &count), out) in weights.iter().zip(&counts).zip(&results.outs) {
                let (from, to) = (first.max(base), end.min(base + count));
                for g in (from..to).step_by(group) {
                    let (g0, g1) = (g - base, (g + group).min(to) - base);
                    let chunk = &data[g0 * panel_lines..g1 * panel_lines];
                    product(acts, chunk, steps, out, g0 * PANEL, count * PANEL);
                }
                base += count;
            }
        });
        // SAFETY: the tasks together cover every panel of every weight, and `product` stores
        // all `n` rows of each of its panels' 64 columns: all values are written.
        unsafe { results.written() }
    }

    /// Multiply every activation row of `acts` by the panels of `chunk` (each `steps` steps
    /// long), the first of which holds output column `col`; results go to `out`, `width`
    /// columns a row.
    fn product(acts: &Acts, chunk: &[Line], steps: usize, out: &Out, col: usize, width: usize) {
        let panel_lines = steps * STEP_LINES;
        assert_eq!(chunk.len() % panel_lines, 0);
        let panels = chunk.len() / panel_lines;
        assert_eq!(acts.width, steps * super::KS);
        assert!(acts.hi.len() >= acts.n * acts.width && acts.lo.len() >= acts.n * acts.width);
        assert!((col + panels * PANEL) <= width && acts.n * width <= out.len);
        for m0 in (0..acts.n).step_by(ROWS) {
            let rows = ROWS.min(acts.n - m0);
            configure(rows);
            for p in 0..panels {
                // SAFETY: tile loads read `rows` rows of 64 bytes at `a + s·64` with the
                // activation stride (inside `acts`: `s·32 + 32 ≤ width`) and 16 rows of 64
                // bytes of tiles inside the panel (`s < steps`); stores write `rows` rows of
                // 4 × 16 f32 at columns `col + p·64 ..` (< `width`) of rows `m0 .. m0 +
                // rows` (< n), all checked by the asserts above.
                unsafe {
                    block(
                        acts.hi.as_ptr().add(m0 * acts.width).cast(),
                        acts.lo.as_ptr().add(m0 * acts.width).cast(),
                        acts.width * 2,
                        chunk.as_ptr().add(p * panel_lines).cast(),
                        steps,
                        out.ptr.add(m0 * width + col + p * PANEL).cast(),
                        width * 4,
                    );
                }
            }
        }
    }

    /// Split `xs` into `hi` and `lo` as [`super::split`] does, 16 values at a time.
    pub(super) fn split_row(xs: &[f32], hi: &mut [u16], lo: &mut [u16]) {
        assert!(super::available() && hi.len() == xs.len() && lo.len() == xs.len());
        // SAFETY: `available` checked AVX-512F; the lengths are checked above.
        unsafe { split_vectors(xs, hi, lo) }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn split_vectors(xs: &[f32], hi: &mut [u16], lo: &mut [u16]) {
        let whole = xs.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: `i + 16 ≤ whole ≤ len` of all three slices.
            unsafe {
                let (h, l) = split16(_mm512_loadu_ps(xs.as_ptr().add(i)));
                let h = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(h));
                let l = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(l));
                _mm256_storeu_si256(hi.as_mut_ptr().add(i).cast(), h);
                _mm256_storeu_si256(lo.as_mut_ptr().add(i).cast(), l);
            }
        }
        for i in whole..xs.len() {
            (hi[i], lo[i]) = super::split(xs[i]);
        }
    }

    /// [`convert`] where [`super::available`] (so AVX-512F).
    pub(super) fn convert_panel(panel: &[f32], k: usize, tiles: &mut [Line]) {
        assert!(super::available());
        // SAFETY: `available` checked AVX-512F; `convert` checks the sizes.
        unsafe { convert(panel, k, tiles) }
    }

    /// `v`'s lanes rounded to bf16 (ties to even; a NaN becomes the quiet NaN, as
    /// [`super::bf16_bits`] does), as f32 bit patterns (low 16 bits zero).
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn round_bf16(v: __m512) -> __m512i {
        let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        let v = _mm512_castps_si512(v);
        let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(v), _mm512_set1_epi32(1));
        let up = _mm512_add_epi32(v, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
        let rounded = _mm512_and_si512(up, _mm512_set1_epi32(0xffff_0000_u32 as i32));
        _mm512_mask_blend_epi32(nan, rounded, _mm512_set1_epi32(0x7fc0_0000))
    }

    /// `v` as `hi + lo` (bf16 each, as f32 bit patterns), as [`super::split`] does.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn split16(v: __m512) -> (__m512i, __m512i) {
        let hi = round_bf16(v);
        let rest = _mm512_sub_ps(v, _mm512_castsi512_ps(hi));
        (hi, round_bf16(rest))
    }

    /// Convert one f32 panel (`[k, PANEL]`) into its AMX tiles (`steps` steps of 8 column
    /// tiles: `hi`, `lo` of each 16 columns; tile row `r` of step `s` holds inputs
    /// `32s + 2r` and `+ 1` of each column as a bf16 pair), inputs past `k` zero.
    #[target_feature(enable = "avx512f")]
    unsafe fn convert(panel: &[f32], k: usize, tiles: &mut [Line]) {
        let steps = k.div_ceil(super::KS);
        assert_eq!(panel.len(), k * PANEL);
        assert_eq!(tiles.len(), steps * STEP_LINES);
        let high = _mm512_set1_epi32(0xffff_0000_u32 as i32);
        let row = |i: usize, j: usize| {
            if i < k {
                // SAFETY: `i < k`, so `i·PANEL + 16j + 16 ≤ k·PANEL` (j < 4).
                unsafe { _mm512_loadu_ps(panel.as_ptr().add(i * PANEL + j * 16)) }
            } else {
                _mm512_setzero_ps()
            }
        };
        for s in 0..steps {
            for r in 0..16 {
                let i = s * super::KS + 2 * r;
                for j in 0..4 {
                    let (even_hi, even_lo) = split16(row(i, j));
                    let (odd_hi, odd_lo) = split16(row(i + 1, j));
                    let hi = _mm512_or_si512(
                        _mm512_srli_epi32::<16>(even_hi),
                        _mm512_and_si512(odd_hi, high),
                    );
                    let lo = _mm512_or_si512(
                        _mm512_srli_epi32::<16>(even_lo),
                        _mm512_and_si512(odd_lo, high),
                    );
                    let at = s * STEP_LINES + j * 2 * super::TILE_LINES + r;
                    // SAFETY: `at + TILE_LINES < steps · STEP_LINES = tiles.len()`; a
                    // `Line` is 64 aligned bytes.
                    unsafe {
                        _mm512_store_si512(tiles.as_mut_ptr().add(at).cast(), hi);
                        _mm512_store_si512(
                            tiles.as_mut_ptr().add(at + super::TILE_LINES).cast(),
                            lo,
                        );
                    }
                }
            }
        }
    }

    /// Load the configuration for `rows`-row tiles. Loaded on every product (it is cheap):
    /// a cached one could have been replaced by other AMX code on the thread (candle's own
    /// AMX kernels), or be gone in a forked child.
    fn configure(rows: usize) {
        let cfg = Config::new(rows);
        // SAFETY: a valid palette-1 configuration (rows ≤ 16, 64 bytes a row); the process
        // was granted the tile state by `enable` (`available` is true whenever tiles exist).
        // Loading a configuration zeroes every tile register: all declared clobbered.
        unsafe {
            asm_on_tiles!(
                [nostack, readonly]
                "ldtilecfg [{}]",
                in(reg) cfg.0.as_ptr()
            )
        };
    }

    /// One tile of activation rows × one panel, over all `steps` (≥ 1), in one `asm!` block
    /// (the accumulators live in tile registers from the first `tilezero` to the stores).
    ///
    /// # Safety
    /// The tile configuration for the rows must be loaded; the pointers and strides must
    /// cover what `product` checks.
    #[inline(always)]
    unsafe fn block(
        a_hi: *const u8,
        a_lo: *const u8,
        a_stride: usize,
        b: *const u8,
        steps: usize,
        c: *mut u8,
        c_stride: usize,
    ) {
        debug_assert!(steps >= 1);
        // SAFETY: see `product`; every tile register is declared clobbered.
        unsafe {
            asm_on_tiles!(
                [nostack]
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{ah} + {ast}*1]",
                "tileloadd tmm5, [{al} + {ast}*1]",
                "tileloadd tmm6, [{b} + {bs}*1]",
                "tileloadd tmm7, [{b} + {bs}*1 + 1024]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm0, tmm5, tmm6",
                "tdpbf16ps tmm0, tmm4, tmm7",
                "tileloadd tmm6, [{b} + {bs}*1 + 2048]",
                "tileloadd tmm7, [{b} + {bs}*1 + 3072]",
                "tdpbf16ps tmm1, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm5, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm6, [{b} + {bs}*1 + 4096]",
                "tileloadd tmm7, [{b} + {bs}*1 + 5120]",
                "tdpbf16ps tmm2, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm2, tmm4, tmm7",
                "tileloadd tmm6, [{b} + {bs}*1 + 6144]",
                "tileloadd tmm7, [{b} + {bs}*1 + 7168]",
                "tdpbf16ps tmm3, tmm4, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm4, tmm7",
                "add {ah}, 64",
                "add {al}, 64",
                "add {b}, 8192",
                "dec {steps}",
                "jnz 2b",
                "tilestored [{c} + {cs}*1], tmm0",
                "tilestored [{c} + {cs}*1 + 64], tmm1",
                "tilestored [{c} + {cs}*1 + 128], tmm2",
                "tilestored [{c} + {cs}*1 + 192], tmm3",
                ah = inout(reg) a_hi => _,
                al = inout(reg) a_lo => _,
                b = inout(reg) b => _,
                steps = inout(reg) steps => _,
                ast = in(reg) a_stride,
                bs = in(reg) 64usize,
                c = in(reg) c,
                cs = in(reg) c_stride
            );
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod kernel {
    pub(super) fn enable() -> bool {
        false
    }
    pub(super) fn multiply(_: &super::Acts, _: &[&[super::Line]], _: usize) -> Vec<Vec<f32>> {
        unreachable!("AMX is x86-64 only")
    }
    pub(super) fn convert_panel(_: &[f32], _: usize, _: &mut [super::Line]) {
        unreachable!("AMX is x86-64 only")
    }
    pub(super) fn split_row(_: &[f32], _: &mut [u16], _: &mut [u16]) {
        unreachable!("AMX is x86-64 only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed::PackedWeight;
    use crate::packed::tests::on_narrow_pools;

    fn amx() -> bool {
        if !available() {
            eprintln!("skipped: no AMX here");
        }
        available()
    }

    /// `x · wᵀ` on AMX, whatever the number of rows.
    fn on_amx(w: &Tensor, x: &Tensor) -> Vec<Vec<f32>> {
        let packed = PackedWeight::pack(w).unwrap().unwrap();
        let y = packed.matmul_t_amx(x).unwrap();
        assert_eq!(y.dims(), [x.dim(0).unwrap(), w.dim(0).unwrap()]);
        y.to_vec2::<f32>().unwrap()
    }

    #[test]
    fn split_halves_keep_sixteen_bits() {
        let mut rng = crate::Rng::new(7);
        for _ in 0..10_000 {
            let v = (rng.uniform() as f32 - 0.5) * 1e3;
            let (hi, lo) = split(v);
            let back = f32::from_bits(u32::from(hi) << 16) + f32::from_bits(u32::from(lo) << 16);
            assert!(
                (back - v).abs() <= v.abs() * 2f32.powi(-16),
                "{v} -> {back}"
            );
        }
        assert_eq!(split(1.0), (0x3f80, 0));
        assert_eq!(split(0.0), (0, 0));
        assert!(f32::from_bits(u32::from(split(f32::NAN).0) << 16).is_nan());
    }

    /// The vector split (activations, weights) gives the scalar one's bits, NaN included.
    #[test]
    fn vector_split_matches_the_scalar_one() {
        if !amx() {
            return;
        }
        let mut rng = crate::Rng::new(3);
        let mut xs: Vec<f32> = (0..1000)
            .map(|_| ((rng.uniform() - 0.5) * 10f64.powi(rng.below(20) as i32 - 10)) as f32)
            .collect();
        // The specials inside a whole 16-value block (the vector path), and in the tail.
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            f32::MAX,
            1e-40,
            -f32::NAN,
        ];
        xs.splice(16..16, specials);
        xs.extend(specials);
        let (mut hi, mut lo) = (vec![0u16; xs.len()], vec![0u16; xs.len()]);
        kernel::split_row(&xs, &mut hi, &mut lo);
        for (i, &v) in xs.iter().enumerate() {
            assert_eq!((hi[i], lo[i]), split(v), "{v}");
        }
    }

    /// Within the stated error of an f64 product, for every row-tile remainder, inputs that
    /// are not a multiple of 32 (688, as `tiny`'s MLP), partial last panels, and panel
    /// groups split between tasks.
    #[test]
    fn matches_an_f64_product() {
        if !amx() {
            return;
        }
        on_narrow_pools(|| {
            let dev = Device::Cpu;
            for (k, out) in [(64, 64), (688, 200), (256, 688), (40, 70), (2080, 1100)] {
                let w = Tensor::randn(0f32, 1., (out, k), &dev).unwrap();
                let wv = w.to_vec2::<f32>().unwrap();
                for n in [1usize, 3, 8, 16, 17, 40] {
                    let x = Tensor::randn(0f32, 1., (n, k), &dev).unwrap();
                    let got = on_amx(&w, &x);
                    let xv = x.to_vec2::<f32>().unwrap();
                    for r in 0..n {
                        for c in (0..out).step_by(7) {
                            let (mut exact, mut mag) = (0f64, 0f64);
                            for i in 0..k {
                                let p = f64::from(xv[r][i]) * f64::from(wv[c][i]);
                                exact += p;
                                mag += p.abs();
                            }
                            let err = (f64::from(got[r][c]) - exact).abs();
                            assert!(
                                err <= mag * 2f64.powi(-15),
                                "k {k} out {out} n {n} [{r}, {c}]: {} vs {exact} (|·| {mag})",
                                got[r][c]
                            );
                        }
                    }
                }
            }
        });
    }

    #[test]
    fn a_row_does_not_depend_on_the_rest_of_the_batch() {
        if !amx() {
            return;
        }
        on_narrow_pools(|| {
            let dev = Device::Cpu;
            let w = Tensor::randn(0f32, 1., (300, 576), &dev).unwrap();
            let x = Tensor::randn(0f32, 1., (37, 576), &dev).unwrap();
            let all = on_amx(&w, &x);
            for n in [1, 2, 5, 16, 17] {
                let some = on_amx(&w, &x.narrow(0, 0, n).unwrap());
                assert_eq!(some, all[..n], "{n} rows");
            }
        });
    }

    #[test]
    fn several_weights_in_one_pass_equal_each_product_alone() {
        if !amx() {
            return;
        }
        // Widths that end in partial panels, so tasks' shares straddle two weights; row counts
        // of one, two and three row tiles.
        on_narrow_pools(|| {
            let dev = Device::Cpu;
            let ws: Vec<Tensor> = [130, 64, 300]
                .iter()
                .map(|&out| Tensor::randn(0f32, 1., (out, 96), &dev).unwrap())
                .collect();
            let packed: Vec<PackedWeight> = ws
                .iter()
                .map(|w| PackedWeight::pack(w).unwrap().unwrap())
                .collect();
            let refs: Vec<&PackedWeight> = packed.iter().collect();
            for n in [MIN_ROWS, 16, 33] {
                let x = Tensor::randn(0f32, 1., (n, 96), &dev).unwrap();
                let together = PackedWeight::matmul_t_many(&refs, &x).unwrap();
                assert_eq!(together.len(), ws.len());
                for (w, y) in ws.iter().zip(&together) {
                    assert_eq!(y.to_vec2::<f32>().unwrap(), on_amx(w, &x), "{n} rows");
                }
                // No rows: empty results of each weight's width.
                let none = PackedWeight::matmul_t_amx(&packed[0], &x.narrow(0, 0, 0).unwrap());
                assert_eq!(none.unwrap().dims(), [0, 130]);
                // A strided input is copied, and multiplied the same.
                let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
                let strided = PackedWeight::matmul_t_many(&refs, &xt).unwrap();
                assert_eq!(
                    strided[2].to_vec2::<f32>().unwrap(),
                    together[2].to_vec2::<f32>().unwrap()
                );
            }
        });
    }

    #[test]
    fn packed_weights_take_amx_from_min_rows() {
        if !amx() {
            return;
        }
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (128, 96), &dev).unwrap();
        let packed = PackedWeight::pack(&w).unwrap().unwrap();
        let x = Tensor::randn(0f32, 1., (MIN_ROWS, 96), &dev).unwrap();
        let got = packed.matmul_t(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(got, on_amx(&w, &x));
        let x = x.narrow(0, 0, MIN_ROWS - 1).unwrap();
        let exact = x.matmul(&w.t().unwrap()).unwrap();
        let got = packed.matmul_t(&x).unwrap();
        assert!(crate::packed::tests::max_diff(&got, &exact) < 1e-4);
        assert_ne!(got.to_vec2::<f32>().unwrap(), on_amx(&w, &x));
    }
}
