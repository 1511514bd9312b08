//! Matrix–vector products for decode steps on the CPU.
//!
//! A decode step multiplies a handful of activation rows by every weight matrix, so it is
//! bound by reading the weights from memory. This reads each weight row once for all
//! activation rows: blocks of four weight rows (a few KiB, kept in L1) are multiplied by every
//! activation row, each row with two independent 8-wide FMA chains, and the blocks are split
//! into one contiguous range per rayon thread. The inner loops are plain Rust compiled for the
//! best instruction set the CPU has at run time (`pulp` dispatch: AVX2+FMA or AVX-512, SSE2
//! otherwise). General matmul kernels tuned for large products reach a fraction of the memory
//! bandwidth on this shape. Only the serving forward uses it (no gradient is recorded).

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Activation rows up to which [`matmul_t_small`] is used. Measured on the `small` shape's
/// 210 layer products (2 threads, AVX2): this path takes 25 / 30 / 42 / 58 ms per step at
/// 1 / 2 / 4 / 8 rows against candle's gemm at 35 / 56 / 57 / 66 ms, and falls behind from
/// about 10 rows (12 rows: 81 vs 72 ms), where the products stop being bound by the weight
/// read.
pub const MAX_ROWS: usize = 8;

/// Weight rows per block: one block of every activation row's partial sums stays in registers.
const BLOCK: usize = 4;
/// Lanes per weight row in the inner loop (two 8-wide FMA chains on AVX2).
const LANES: usize = 16;

/// Whether the CPU fuses multiply-add; without it `mul_add` would be a slow library call.
fn has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, acc: f32) -> f32 {
    if FMA { a.mul_add(b, acc) } else { a * b + acc }
}

/// `out[j·n + r] = w_j · x_r` for the 4 weight rows of `w` and all `n` rows of `xs`.
#[inline(always)]
fn block4<const FMA: bool>(w: &[f32], xs: &[f32], k: usize, n: usize, out: &mut [f32]) {
    let (w0, rest) = w.split_at(k);
    let (w1, rest) = rest.split_at(k);
    let (w2, w3) = rest.split_at(k);
    let full = k / LANES * LANES;
    for r in 0..n {
        let x = &xs[r * k..(r + 1) * k];
        let mut acc = [[0f32; LANES]; BLOCK];
        for c in (0..full).step_by(LANES) {
            let xv = &x[c..c + LANES];
            let (a0, a1, a2, a3) = (
                &w0[c..c + LANES],
                &w1[c..c + LANES],
                &w2[c..c + LANES],
                &w3[c..c + LANES],
            );
            for i in 0..LANES {
                acc[0][i] = madd::<FMA>(a0[i], xv[i], acc[0][i]);
                acc[1][i] = madd::<FMA>(a1[i], xv[i], acc[1][i]);
                acc[2][i] = madd::<FMA>(a2[i], xv[i], acc[2][i]);
                acc[3][i] = madd::<FMA>(a3[i], xv[i], acc[3][i]);
            }
        }
        for (j, (row, acc)) in [w0, w1, w2, w3].into_iter().zip(acc).enumerate() {
            let tail: f32 = row[full..].iter().zip(&x[full..]).map(|(a, b)| a * b).sum();
            out[j * n + r] = acc.iter().sum::<f32>() + tail;
        }
    }
}

/// `out[j·n + r] = w_j · x_r` for one weight row.
#[inline(always)]
fn single(w: &[f32], xs: &[f32], k: usize, n: usize, out: &mut [f32]) {
    for (r, d) in out.iter_mut().enumerate().take(n) {
        *d = w
            .iter()
            .zip(&xs[r * k..(r + 1) * k])
            .map(|(a, b)| a * b)
            .sum();
    }
}

/// One task's weight rows (`w`, `out.len() / n` of them) times every activation row.
struct Rows<'a> {
    fma: bool,
    w: &'a [f32],
    xs: &'a [f32],
    k: usize,
    n: usize,
    out: &'a mut [f32],
}

impl pulp::WithSimd for Rows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let Rows {
            fma,
            w,
            xs,
            k,
            n,
            out,
        } = self;
        for (b, dst) in out.chunks_exact_mut(BLOCK * n).enumerate() {
            let w = &w[b * BLOCK * k..(b + 1) * BLOCK * k];
            if fma {
                block4::<true>(w, xs, k, n, dst);
            } else {
                block4::<false>(w, xs, k, n, dst);
            }
        }
        let done = out.len() / (BLOCK * n) * BLOCK;
        for (j, dst) in out[done * n..].chunks_exact_mut(n).enumerate() {
            single(&w[(done + j) * k..(done + j + 1) * k], xs, k, n, dst);
        }
    }
}

/// `x [n, in] · wᵀ` for f32 CPU tensors with `n <= MAX_ROWS`; `None` when not applicable.
pub fn matmul_t_small(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (n, k) = x.dims2()?;
    let (out, k2) = w.dims2()?;
    if n == 0
        || out == 0
        || n > MAX_ROWS
        || k != k2
        || x.dtype() != DType::F32
        || w.dtype() != DType::F32
        || !matches!(w.device(), Device::Cpu)
    {
        return Ok(None);
    }
    let (w_storage, w_layout) = w.storage_and_layout();
    let (Storage::Cpu(w_cpu), Some((ws, we))) = (&*w_storage, w_layout.contiguous_offsets()) else {
        return Ok(None);
    };
    let w_data = &w_cpu.as_slice::<f32>()?[ws..we];
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    // Output is filled weight-row-major ([out, n]) so each task owns a contiguous slice; one
    // range of whole blocks per thread keeps the hand-offs to one per thread and call.
    let threads = rayon::current_num_threads().max(1);
    let rows_per_task = out.div_ceil(threads).div_ceil(BLOCK) * BLOCK;
    let mut res = vec![0f32; out * n];
    let arch = pulp::Arch::new();
    let fma = has_fma();
    res.par_chunks_mut(rows_per_task * n)
        .enumerate()
        .for_each(|(task, dst)| {
            let first = task * rows_per_task;
            let rows = dst.len() / n;
            arch.dispatch(Rows {
                fma,
                w: &w_data[first * k..(first + rows) * k],
                xs: &xs,
                k,
                n,
                out: dst,
            });
        });
    let t = Tensor::from_vec(res, (out, n), &Device::Cpu)?;
    Ok(Some(if n == 1 {
        t.reshape((1, out))?
    } else {
        t.t()?.contiguous()?
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_candle_matmul() {
        // Row counts and widths that leave partial blocks, partial lanes and uneven tasks.
        for (n, out, k) in [
            (1, 130, 70),
            (3, 130, 70),
            (MAX_ROWS, 130, 70),
            (2, 9, 16),
            (1, 4, 5),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).expect("randn");
            let w = Tensor::randn(0f32, 1.0, (out, k), &Device::Cpu).expect("randn");
            let want = x.matmul(&w.t().expect("t")).expect("matmul");
            let got = matmul_t_small(&x, &w).expect("gemv").expect("applicable");
            let d = (want - got)
                .expect("sub")
                .abs()
                .expect("abs")
                .max_all()
                .expect("max");
            assert!(d.to_scalar::<f32>().expect("s") < 1e-4);
        }
        let big = Tensor::zeros((MAX_ROWS + 1, 8), DType::F32, &Device::Cpu).expect("zeros");
        let w = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).expect("zeros");
        assert!(matmul_t_small(&big, &w).expect("ok").is_none());
    }
}
