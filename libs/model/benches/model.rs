//! `make bench` for libs/model: training, prefill and decode throughput and peak memory on
//! the BENCH.md shapes with seeded random weights, printed beside Python `transformers` run in
//! the same invocation when Python with torch is available.
//!
//! The process re-executes itself with `alloc_tuning::MALLOC_ENV` first.
//! Environment: `LMFORGE_BENCH_SHAPES` (default `tiny,small`), `LMFORGE_BENCH_PYTHON` (default
//! `.venv-bench/bin/python`, then `python3`), `LMFORGE_BENCH_SKIP_TRAIN=1`.

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lmforge_model::infer::SeqInput;
use lmforge_model::kv_cache::{BlockTable, PagedKvCache};
use lmforge_model::optim::{AdamWConfig, LrSchedule};
use lmforge_model::train::{Batch, TrainConfig, Trainer};
use lmforge_model::{Model, ModelConfig, Rng, quant, weights};

const PROMPT: usize = 32;
const NEW_TOKENS: usize = 64;

#[derive(Default, Clone)]
struct Figures {
    train: f64,
    prefill: f64,
    decode1: f64,
    decode16: f64,
    decode1_q8: f64,
    decode16_q8: f64,
    peak_mb: f64,
}

/// Peak resident memory since the last reset, in MB (Linux).
fn peak_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(str::to_string)
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn reset_peak() {
    // Writing 5 to clear_refs resets VmHWM to the current RSS.
    std::fs::write("/proc/self/clear_refs", "5").ok();
}

fn ids(rng: &mut Rng, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

fn argmax_rows(logits: &Tensor) -> Vec<u32> {
    let rows = logits.to_vec2::<f32>().expect("logits are [n, vocab] f32");
    rows.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                .0 as u32
        })
        .collect()
}

/// Greedy generation of `NEW_TOKENS` for `batch` prompts; returns decode tokens/s.
fn decode(model: &Model, cfg: &ModelConfig, batch: usize) -> f64 {
    let blocks_per_seq = (PROMPT + NEW_TOKENS).div_ceil(16);
    let mut cache = PagedKvCache::new(cfg, batch * blocks_per_seq, 16, DType::F32, &Device::Cpu)
        .expect("cache");
    let mut rng = Rng::new(7);
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|_| ids(&mut rng, PROMPT, cfg.vocab_size))
        .collect();
    let mut tables = vec![BlockTable::default(); batch];
    let mut inputs: Vec<SeqInput<'_>> = tables
        .iter_mut()
        .zip(&prompts)
        .map(|(table, p)| SeqInput { tokens: p, table })
        .collect();
    let mut next = argmax_rows(
        &model
            .forward_batch(&mut cache, &mut inputs)
            .expect("prefill"),
    );
    drop(inputs);
    let start = Instant::now();
    for _ in 0..NEW_TOKENS {
        let toks: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
        let mut inputs: Vec<SeqInput<'_>> = tables
            .iter_mut()
            .zip(&toks)
            .map(|(table, t)| SeqInput { tokens: t, table })
            .collect();
        next = argmax_rows(
            &model
                .forward_batch(&mut cache, &mut inputs)
                .expect("decode"),
        );
    }
    (batch * NEW_TOKENS) as f64 / start.elapsed().as_secs_f64()
}

/// Prefill of `n` tokens into an empty cache, timed on the second run (the reference warms
/// up the same way).
fn prefill(model: &Model, cfg: &ModelConfig, n: usize) -> f64 {
    let toks = ids(&mut Rng::new(3), n, cfg.vocab_size);
    let mut rate = 0.0;
    for _ in 0..2 {
        let mut cache =
            PagedKvCache::new(cfg, n.div_ceil(16), 16, DType::F32, &Device::Cpu).expect("cache");
        let mut table = BlockTable::default();
        let start = Instant::now();
        model
            .forward_batch(
                &mut cache,
                &mut [SeqInput {
                    tokens: &toks,
                    table: &mut table,
                }],
            )
            .expect("prefill");
        rate = n as f64 / start.elapsed().as_secs_f64();
    }
    rate
}

fn train(cfg: &ModelConfig) -> f64 {
    let map = weights::init_weights(cfg, DType::F32, &Device::Cpu, 0).expect("init");
    let model = Model::new(cfg, &map).expect("model");
    let tc = TrainConfig {
        schedule: LrSchedule::constant(1e-4),
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        dropout: 0.0,
        seed: 0,
    };
    let mut trainer = Trainer::new(model, weights::sorted_vars(&map), tc).expect("trainer");
    let (b, t) = (8, 256);
    let data = ids(&mut Rng::new(1), b * t, cfg.vocab_size);
    let batch = Batch {
        input_ids: Tensor::from_vec(data, (b, t), &Device::Cpu).expect("ids"),
        attention_mask: Tensor::ones((b, t), DType::U32, &Device::Cpu).expect("ones"),
        label_mask: Tensor::ones((b, t), DType::F32, &Device::Cpu).expect("ones"),
    };
    trainer
        .train_step(std::slice::from_ref(&batch))
        .expect("warm-up step");
    // The median of three steps (the transformers script times the same).
    let mut rates: Vec<f64> = (0..3)
        .map(|_| {
            let start = Instant::now();
            trainer
                .train_step(std::slice::from_ref(&batch))
                .expect("step");
            (b * t) as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[1]
}

fn lmforge(shape: &str, cfg: &ModelConfig) -> Figures {
    let mut f = Figures::default();
    reset_peak();
    if std::env::var("LMFORGE_BENCH_SKIP_TRAIN").is_err() {
        f.train = train(cfg);
    }
    let map = weights::init_weights(cfg, DType::F32, &Device::Cpu, 0).expect("init");
    let mut model = Model::new(cfg, &map).expect("model");
    model.pack_for_serving().expect("pack");
    f.prefill = prefill(&model, cfg, 256);
    f.decode1 = decode(&model, cfg, 1);
    f.decode16 = decode(&model, cfg, 16);
    f.peak_mb = peak_mb();
    let mut q = model.clone();
    quant::quantize_q8_0(&mut q).expect("quantize");
    drop(model);
    f.decode1_q8 = decode(&q, cfg, 1);
    f.decode16_q8 = decode(&q, cfg, 16);
    eprintln!("lmforge {shape} done");
    f
}

fn transformers(shape: &str) -> Option<Figures> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/model/bench_transformers.py"
    );
    let pythons = match std::env::var("LMFORGE_BENCH_PYTHON") {
        Ok(p) => vec![p],
        Err(_) => vec![
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../.venv-bench/bin/python").to_string(),
            "python3".into(),
        ],
    };
    for py in pythons {
        let out = Command::new(&py)
            .args([script, "--shape", shape])
            .output()
            .ok()?;
        if !out.status.success() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let g = |k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(f64::NAN)
        };
        return Some(Figures {
            train: g("train"),
            prefill: g("prefill"),
            decode1: g("decode1"),
            decode16: g("decode16"),
            peak_mb: g("peak_mb"),
            ..Figures::default()
        });
    }
    None
}

fn main() {
    if let Some(code) = lmforge_model::alloc_tuning::reexec_with_tuned_malloc() {
        std::process::exit(code);
    }
    let shapes = std::env::var("LMFORGE_BENCH_SHAPES").unwrap_or_else(|_| "tiny,small".into());
    println!("| shape | figure | lmforge f32 | lmforge q8_0 | transformers f32 | ratio (f32) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for shape in shapes.split(',') {
        let cfg = match shape {
            "tiny" => ModelConfig::tiny(),
            "small" => ModelConfig::small(),
            other => {
                eprintln!("unknown shape {other}");
                continue;
            }
        };
        let ours = lmforge(shape, &cfg);
        let theirs = transformers(shape);
        let rows = [
            (
                "training tok/s (8x256)",
                ours.train,
                None,
                theirs.as_ref().map(|t| t.train),
            ),
            (
                "prefill tok/s (256)",
                ours.prefill,
                None,
                theirs.as_ref().map(|t| t.prefill),
            ),
            (
                "decode tok/s batch 1",
                ours.decode1,
                Some(ours.decode1_q8),
                theirs.as_ref().map(|t| t.decode1),
            ),
            (
                "decode tok/s batch 16",
                ours.decode16,
                Some(ours.decode16_q8),
                theirs.as_ref().map(|t| t.decode16),
            ),
            (
                "peak memory MB",
                ours.peak_mb,
                None,
                theirs.as_ref().map(|t| t.peak_mb),
            ),
        ];
        for (name, f32v, q8, reference) in rows {
            let q8 = q8.map_or("-".to_string(), |v| format!("{v:.1}"));
            let (r, ratio) = match reference {
                Some(r) if r.is_finite() => (format!("{r:.1}"), format!("{:.2}x", f32v / r)),
                _ => ("n/a".to_string(), "-".to_string()),
            };
            println!("| {shape} | {name} | {f32v:.1} | {q8} | {r} | {ratio} |");
        }
    }
}
