//! Engine throughput without the network: C streams at once, each a 32-token prompt and 64
//! generated tokens, on the BENCH.md shapes with random weights. Prints aggregate output
//! tokens/s per concurrency (the gRPC-level figures come from `lmforge bench serve`).
//!
//! `LMFORGE_BENCH_SHAPES=tiny,small` and `LMFORGE_BENCH_STREAMS=1,8,32,64` select the runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use lmforge_inference::engine::{self, EngineConfig, EngineRequest, Event};
use lmforge_model::rng::Rng;
use lmforge_model::sampling::SamplingParams;
use lmforge_model::stopping::StopConfig;
use lmforge_model::tokenizer::TextTokenizer;
use lmforge_model::{Model, ModelConfig, weights};

/// A word-level tokenizer with one token per id, so any id decodes.
fn tokenizer(vocab: usize) -> TextTokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> = (0..vocab)
        .map(|i| (format!("t{i}"), serde_json::Value::from(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
        "pre_tokenizer": {"type": "Whitespace"},
        "decoder": null,
    });
    let inner = tokenizers::Tokenizer::from_bytes(json.to_string()).expect("tokenizer");
    TextTokenizer {
        inner,
        bos_token: None,
        eos_token: None,
        pad_token: None,
        chat_template: None,
    }
}

fn main() {
    if let Some(code) = lmforge_model::alloc_tuning::reexec_with_tuned_malloc() {
        std::process::exit(code);
    }
    let shapes = std::env::var("LMFORGE_BENCH_SHAPES").unwrap_or_else(|_| "tiny,small".into());
    let streams: Vec<usize> = std::env::var("LMFORGE_BENCH_STREAMS")
        .unwrap_or_else(|_| "1,8,32,64".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    println!("| shape | streams | output tok/s | wall / 64 | wall |");
    println!("| --- | --- | --- | --- | --- |");
    for shape in shapes.split(',') {
        let cfg = match shape.trim() {
            "small" => ModelConfig::small(),
            _ => ModelConfig::tiny(),
        };
        let map = weights::init_weights(&cfg, DType::F32, &Device::Cpu, 7).expect("weights");
        let mut model = Model::new(&cfg, &map).expect("model");
        model.pack_for_serving().expect("pack");
        let tok = Arc::new(tokenizer(cfg.vocab_size));
        let handle = engine::spawn(
            model,
            tok,
            EngineConfig {
                num_blocks: 64 * 96 / 16 + 64,
                ..Default::default()
            },
            shape,
        )
        .expect("engine");
        // Every run of every level draws prompts of its own: a run reusing earlier prompts
        // would find their first block in the prefix cache and skip half of their prefill.
        let mut rng = Rng::new(7);
        for &c in &streams {
            let mut run = |tag: &str| {
                let started = Instant::now();
                let rxs: Vec<_> = (0..c)
                    .map(|i| {
                        let prompt = (0..32)
                            .map(|_| 3 + rng.below(cfg.vocab_size - 3) as u32)
                            .collect();
                        handle
                            .submit(EngineRequest {
                                id: format!("{tag}{i}"),
                                prompt,
                                sampling: SamplingParams::greedy(),
                                stop: StopConfig {
                                    max_tokens: Some(64),
                                    ..Default::default()
                                },
                                min_tokens: 0,
                                logit_bias: vec![],
                                format: None,
                                n: 1,
                                priority: 0,
                                deadline: None,
                                arrived: Instant::now(),
                                span: opentelemetry::trace::SpanContext::empty_context(),
                            })
                            .expect("submit")
                    })
                    .collect();
                let tokens: usize = rt.block_on(async {
                    let mut total = 0;
                    for mut rx in rxs {
                        while let Some(e) = rx.recv().await {
                            match e {
                                Event::Token { .. } => total += 1,
                                Event::Finished { .. } => break,
                                _ => {}
                            }
                        }
                    }
                    total
                });
                (tokens, started.elapsed())
            };
            run("warm"); // first touch of the cache and weights
            let (tokens, wall) = run("run");
            let rate = tokens as f64 / wall.as_secs_f64();
            println!(
                "| {shape} | {c} | {rate:.1} | {:.1} ms | {:.2} s |",
                wall.as_secs_f64() * 1000.0 / 64.0,
                wall.as_secs_f64()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        handle.shutdown();
    }
}
