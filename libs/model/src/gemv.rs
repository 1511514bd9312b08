//! Matrix–vector products for decode steps on the CPU.
//!
//! A decode step multiplies a handful of activation rows by every weight matrix, so it is
//! bound by reading the weights from memory. This reads each weight row once for all
//! activation rows, splits the weight rows over rayon's threads, and keeps eight partial sums
//! so the compiler vectorises the dot products. General matmul kernels tuned for large
//! products reach a fraction of the memory bandwidth on this shape. Only the serving forward
//! uses it (no gradient is recorded).

use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;

/// Activation rows up to which [`matmul_t_small`] is used.
pub const MAX_ROWS: usize = 16;

/// Weight rows per parallel task: large enough to amortise scheduling.
const ROWS_PER_TASK: usize = 64;

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `x [n, in] · wᵀ` for f32 CPU tensors with `n <= MAX_ROWS`; `None` when not applicable.
pub fn matmul_t_small(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (n, k) = x.dims2()?;
    let (out, k2) = w.dims2()?;
    if n > MAX_ROWS
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
    // Output is filled weight-row-major ([out, n]) so each task owns a contiguous slice.
    let mut res = vec![0f32; out * n];
    res.par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each(|(task, chunk)| {
            let first = task * ROWS_PER_TASK;
            for (j, dst) in chunk.chunks_exact_mut(n).enumerate() {
                let row = &w_data[(first + j) * k..(first + j + 1) * k];
                for (r, d) in dst.iter_mut().enumerate() {
                    *d = dot(row, &xs[r * k..(r + 1) * k]);
                }
            }
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
        for n in [1, 3, 16] {
            let x = Tensor::randn(0f32, 1.0, (n, 70), &Device::Cpu).expect("randn");
            let w = Tensor::randn(0f32, 1.0, (130, 70), &Device::Cpu).expect("randn");
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
        let big = Tensor::zeros((17, 8), DType::F32, &Device::Cpu).expect("zeros");
        let w = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).expect("zeros");
        assert!(matmul_t_small(&big, &w).expect("ok").is_none());
    }
}
