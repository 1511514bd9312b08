//! Greedy decode steps of a shape with random weights, for profiling one configuration:
//! `cargo run --release -p lmforge-model --example decode_steps -- small 1 q8 200`
//! (shape, batch, `f32` or `q8`, steps); prints decode tokens/s. With 0 steps it times the
//! prefill of `batch` prompts instead; `REPEAT=n` does either n times from fresh prompts (the
//! decode figure only times the steps). Prompts are 32 tokens (`PROMPT=256` for longer);
//! `LMFORGE_AMX=0` runs the f32 products without AMX, for A/B runs.

use std::time::Instant;

use candle_core::{DType, Device};
use lmforge_model::infer::SeqInput;
use lmforge_model::kv_cache::{BlockTable, PagedKvCache};
use lmforge_model::{Model, ModelConfig, quant, weights};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The allocator settings the services and benchmarks run with.
    if let Some(code) = lmforge_model::alloc_tuning::reexec_with_tuned_malloc() {
        std::process::exit(code);
    }
    let args: Vec<String> = std::env::args().collect();
    let shape = args.get(1).map_or("small", String::as_str);
    let batch: usize = args.get(2).map_or(Ok(1), |s| s.parse())?;
    let q8 = args.get(3).is_some_and(|s| s == "q8");
    let steps: usize = args.get(4).map_or(Ok(200), |s| s.parse())?;
    let cfg = match shape {
        "tiny" => ModelConfig::tiny(),
        "small" => ModelConfig::small(),
        _ => return Err("shape: tiny or small".into()),
    };
    let map = weights::init_weights(&cfg, DType::F32, &Device::Cpu, 0)?;
    let mut model = Model::new(&cfg, &map)?;
    if q8 {
        quant::quantize_q8_0(&mut model)?;
    } else {
        model.pack_for_serving()?;
    }
    let prompt: usize = std::env::var("PROMPT").map_or(Ok(32), |s| s.parse())?;
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|b| {
            (0..prompt as u32)
                .map(|i| (i * 7 + b as u32) % 1000)
                .collect()
        })
        .collect();
    // Every prompt into a fresh cache of `blocks` blocks a sequence: the cache and tables.
    let prefill = |blocks: usize| -> Result<_, Box<dyn std::error::Error>> {
        let mut cache = PagedKvCache::new(&cfg, batch * blocks, 16, DType::F32, &Device::Cpu)?;
        let mut tables = vec![BlockTable::default(); batch];
        let mut inputs: Vec<SeqInput<'_>> = tables
            .iter_mut()
            .zip(&prompts)
            .map(|(table, p)| SeqInput { tokens: p, table })
            .collect();
        model.forward_batch(&mut cache, &mut inputs)?;
        Ok((cache, tables))
    };
    // `REPEAT=n` runs the prefill (or the decode steps from fresh prompts) n times, so short
    // contexts like a serving benchmark's can be profiled for longer.
    let repeat: usize =
        std::env::var("REPEAT").map_or(Ok(if steps == 0 { 10 } else { 1 }), |s| s.parse())?;
    if steps == 0 {
        // Prefill only: `batch` prompts in one forward, `repeat` times.
        let start = Instant::now();
        for _ in 0..repeat {
            prefill(prompt.div_ceil(16))?;
        }
        let secs = start.elapsed().as_secs_f64() / repeat as f64;
        println!(
            "{shape} prefill of {batch} × {prompt} tokens: {:.1} tok/s ({:.1} ms)",
            (batch * prompt) as f64 / secs,
            secs * 1e3
        );
        return Ok(());
    }
    let mut secs = 0.0;
    for _ in 0..repeat {
        secs += decode(
            &model,
            prefill((prompt + steps).div_ceil(16))?,
            batch,
            steps,
        )?;
    }
    let steps = steps * repeat;
    println!(
        "{shape} batch {batch} {}: {:.1} tok/s ({:.2} ms a step)",
        if q8 { "q8_0" } else { "f32" },
        (batch * steps) as f64 / secs,
        secs * 1e3 / steps as f64
    );
    Ok(())
}

/// `steps` greedy-shaped decode steps of every sequence; returns the seconds they took.
fn decode(
    model: &Model,
    (mut cache, mut tables): (PagedKvCache, Vec<BlockTable>),
    batch: usize,
    steps: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let start = Instant::now();
    for step in 0..steps {
        let toks: Vec<[u32; 1]> = (0..batch)
            .map(|b| [(step * 13 + b) as u32 % 1000])
            .collect();
        let mut inputs: Vec<SeqInput<'_>> = tables
            .iter_mut()
            .zip(&toks)
            .map(|(table, t)| SeqInput { tokens: t, table })
            .collect();
        model.forward_batch(&mut cache, &mut inputs)?;
    }
    Ok(start.elapsed().as_secs_f64())
}
