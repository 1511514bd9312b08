//! The products of a `small` decode step, packed weights ([`lmforge_model::packed`]) against
//! candle's gemm (and the packed q8_0 weights of [`lmforge_model::packed_q8`], with the rate
//! they read the weight at), at the row counts a batch of decodes (and a prefill) has; best of 7 runs.
//! The figures behind `packed::MAX_ROWS`:
//! `cargo run --release -p lmforge-model --example packed_vs_gemm`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use lmforge_model::packed::PackedWeight;
use lmforge_model::packed_q8::PackedQ8;

fn best_of<F: FnMut() -> candle_core::Result<()>>(mut f: F) -> candle_core::Result<f64> {
    f()?;
    let mut best = f64::MAX;
    for _ in 0..7 {
        let start = Instant::now();
        for _ in 0..10 {
            f()?;
        }
        best = best.min(start.elapsed().as_secs_f64() / 10.0);
    }
    Ok(best)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    println!(
        "| in -> out | rows | candle ms | packed ms | packed GFLOP/s | AMX ms | AMX GFLOP/s | q8_0 ms | q8_0 GB/s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (k, out) in [(576, 1536), (1536, 576), (576, 192), (576, 49152)] {
        let w = Tensor::randn(0f32, 1., (out, k), &dev)?;
        let packed = PackedWeight::pack(&w)?.ok_or("f32 CPU weight")?;
        let q8 = PackedQ8::quantize(&w)?;
        let amx = lmforge_model::amx::available().then_some(&packed);
        for n in [1usize, 2, 4, 8, 16, 32, 64, 128, 256, 512] {
            let x = Tensor::randn(0f32, 1., (n, k), &dev)?;
            let flops = 2.0 * (n * k * out) as f64;
            let gemm = best_of(|| x.matmul(&w.t()?).map(drop))?;
            // Best time of a product of ours, and the columns it prints (ms, then `rate(t)`).
            let ours = |f: &dyn Fn() -> lmforge_model::Result<Tensor>| {
                best_of(|| {
                    f().map(drop)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))
                })
            };
            let columns = |t: f64, rate: f64| (format!("{:.3}", t * 1e3), format!("{rate:.1}"));
            let fma = ours(&|| packed.matmul_t_fma(&x))?;
            let (amx_ms, amx_gflops) = match &amx {
                Some(amx) => {
                    let t = ours(&|| amx.matmul_t_amx(&x))?;
                    columns(t, flops / t / 1e9)
                }
                None => ("-".into(), "-".into()),
            };
            let (q8_ms, q8_gbs) = match &q8 {
                Some(q8) => {
                    let t = ours(&|| q8.matmul_t(&x))?;
                    columns(t, q8.bytes() as f64 / t / 1e9)
                }
                None => ("-".into(), "-".into()),
            };
            println!(
                "| {k} -> {out} | {n} | {:.3} | {:.3} | {:.1} | {amx_ms} | {amx_gflops} | {q8_ms} | {q8_gbs} |",
                gemm * 1e3,
                fma * 1e3,
                flops / fma / 1e9
            );
        }
    }
    Ok(())
}
