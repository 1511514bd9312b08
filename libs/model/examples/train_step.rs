//! Training steps of a shape with random weights (batch 8 × 256 tokens, as `make bench`), for
//! profiling: `cargo run --release -p lmforge-model --example train_step -- small 3`
//! (shape, steps); prints tokens/s of each step after a warm-up step. `LMFORGE_TRAIN_AUTOGRAD=1`
//! runs the steps through candle's autograd instead of the hand-written backward, for A/B runs.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lmforge_model::optim::{AdamWConfig, LrSchedule};
use lmforge_model::train::{Batch, TrainConfig, Trainer};
use lmforge_model::{Model, ModelConfig, weights};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Some(code) = lmforge_model::alloc_tuning::reexec_with_tuned_malloc() {
        std::process::exit(code);
    }
    let args: Vec<String> = std::env::args().collect();
    let shape = args.get(1).map_or("small", String::as_str);
    let steps: usize = args.get(2).map_or(Ok(3), |s| s.parse())?;
    let cfg = match shape {
        "tiny" => ModelConfig::tiny(),
        "small" => ModelConfig::small(),
        _ => return Err("shape: tiny or small".into()),
    };
    let map = weights::init_weights(&cfg, DType::F32, &Device::Cpu, 0)?;
    let model = Model::new(&cfg, &map)?;
    let tc = TrainConfig {
        schedule: LrSchedule::constant(1e-4),
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        dropout: 0.0,
        seed: 0,
    };
    let mut trainer = Trainer::new(model, weights::sorted_vars(&map), tc)?;
    let (b, t) = (8, 256);
    let data: Vec<u32> = (0..(b * t) as u32)
        .map(|i| (i * 7919 + 13) % cfg.vocab_size as u32)
        .collect();
    let batch = Batch {
        input_ids: Tensor::from_vec(data, (b, t), &Device::Cpu)?,
        attention_mask: Tensor::ones((b, t), DType::U32, &Device::Cpu)?,
        label_mask: Tensor::ones((b, t), DType::F32, &Device::Cpu)?,
    };
    trainer.train_step(std::slice::from_ref(&batch))?;
    for _ in 0..steps {
        let start = Instant::now();
        let stats = trainer.train_step(std::slice::from_ref(&batch))?;
        println!(
            "{shape} step: {:.1} tok/s, loss {:.4}",
            (b * t) as f64 / start.elapsed().as_secs_f64(),
            stats.loss
        );
    }
    Ok(())
}
