//! Training behaviour: accumulation equals the large batch, resume repeats the curve,
//! same seed repeats the run, and a tiny model overfits a fixed set.

mod common;

use candle_core::{DType, Device, Tensor};
use lmforge_model::optim::{AdamWConfig, LrSchedule, ScheduleKind};
use lmforge_model::train::{Batch, TrainConfig, Trainer};
use lmforge_model::{Architecture, Model, ModelConfig, weights};

fn config(dropout: f32) -> TrainConfig {
    TrainConfig {
        schedule: LrSchedule {
            kind: ScheduleKind::Cosine,
            peak_lr: 1e-2,
            min_lr: 1e-3,
            warmup_steps: 2,
            total_steps: 8,
        },
        adamw: AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
        max_grad_norm: Some(0.5),
        dropout,
        seed: 42,
    }
}

fn trainer(cfg: &ModelConfig, dtype: DType, tc: TrainConfig) -> Trainer {
    let map = common::random_weights(cfg, dtype, 1, 0.1);
    let model = Model::new(cfg, &map).expect("model");
    Trainer::new(model, weights::sorted_vars(&map), tc).expect("trainer")
}

/// Rows of `ids` with left padding `pads[row]` and the first `prompt` real tokens unlabelled.
fn batch(ids: &Tensor, pads: &[usize], prompt: usize) -> Batch {
    let (b, t) = ids.dims2().expect("2d");
    let mut attn = vec![0u32; b * t];
    let mut labels = vec![0f32; b * t];
    for r in 0..b {
        for c in pads[r]..t {
            attn[r * t + c] = 1;
            if c >= pads[r] + prompt {
                labels[r * t + c] = 1.0;
            }
        }
    }
    Batch {
        input_ids: ids.clone(),
        attention_mask: Tensor::from_vec(attn, (b, t), &Device::Cpu).expect("shape"),
        label_mask: Tensor::from_vec(labels, (b, t), &Device::Cpu).expect("shape"),
    }
}

#[test]
fn gradient_accumulation_equals_the_larger_batch() {
    let cfg = common::micro_config(Architecture::Llama, false);
    let ids = common::random_ids(4, 8, cfg.vocab_size, 9);
    // Unequal padding, so per-micro-batch normalisation would give a different answer.
    let pads = [0, 3, 1, 5];
    let full = batch(&ids, &pads, 1);
    let halves = [
        batch(&ids.narrow(0, 0, 2).expect("rows"), &pads[..2], 1),
        batch(&ids.narrow(0, 2, 2).expect("rows"), &pads[2..], 1),
    ];
    let mut a = trainer(&cfg, DType::F64, config(0.0));
    let mut b = trainer(&cfg, DType::F64, config(0.0));
    for _ in 0..2 {
        let sa = a.train_step(std::slice::from_ref(&full)).expect("step");
        let sb = b.train_step(&halves).expect("step");
        assert!(
            (sa.loss - sb.loss).abs() < 1e-12,
            "{} vs {}",
            sa.loss,
            sb.loss
        );
        assert!((sa.grad_norm - sb.grad_norm).abs() < 1e-10);
        assert_eq!(sa.tokens, sb.tokens);
    }
    for ((name, va), (_, vb)) in a.optimizer.vars.iter().zip(&b.optimizer.vars) {
        let d = common::max_abs_diff(va.as_tensor(), vb.as_tensor());
        assert!(d < 1e-6, "{name} differs by {d}");
    }
}

#[test]
fn resume_reproduces_the_uninterrupted_loss_curve() {
    let cfg = common::micro_config(Architecture::Qwen2, true);
    let data = batch(&common::random_ids(2, 10, cfg.vocab_size, 4), &[0, 2], 2);
    let steps = 6;
    let mut straight = trainer(&cfg, DType::F32, config(0.1));
    let curve: Vec<f64> = (0..steps)
        .map(|_| {
            straight
                .train_step(std::slice::from_ref(&data))
                .expect("step")
                .loss
        })
        .collect();
    // Same seed from scratch gives the same curve: the run is deterministic.
    let mut again = trainer(&cfg, DType::F32, config(0.1));
    let first = again
        .train_step(std::slice::from_ref(&data))
        .expect("step")
        .loss;
    assert_eq!(first, curve[0]);

    let dir = std::env::temp_dir().join(format!("lmforge-resume-{}", std::process::id()));
    let mut part = trainer(&cfg, DType::F32, config(0.1));
    let mut resumed_curve: Vec<f64> = (0..3)
        .map(|_| {
            part.train_step(std::slice::from_ref(&data))
                .expect("step")
                .loss
        })
        .collect();
    part.save_checkpoint(&dir).expect("save");
    drop(part);
    // A fresh process would build a model from a different init; the checkpoint overrides it.
    let mut other = config(0.1);
    other.seed = 999;
    let mut resumed = trainer(&cfg, DType::F32, other);
    resumed.load_checkpoint(&dir).expect("load");
    assert_eq!(resumed.step, 3);
    resumed_curve.extend((3..steps).map(|_| {
        resumed
            .train_step(std::slice::from_ref(&data))
            .expect("step")
            .loss
    }));
    assert_eq!(resumed_curve, curve);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn tiny_model_overfits_a_fixed_set() {
    let mut cfg = common::micro_config(Architecture::Llama, false);
    cfg.hidden_size = 32;
    cfg.head_dim = 8;
    cfg.intermediate_size = 64;
    let data = batch(
        &common::random_ids(4, 12, cfg.vocab_size, 21),
        &[0, 0, 0, 0],
        1,
    );
    let tc = TrainConfig {
        schedule: LrSchedule {
            kind: ScheduleKind::Constant,
            peak_lr: 1e-2,
            min_lr: 1e-2,
            warmup_steps: 5,
            total_steps: 300,
        },
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        dropout: 0.0,
        seed: 0,
    };
    let mut t = trainer(&cfg, DType::F32, tc);
    let mut last = f64::INFINITY;
    for step in 0..300 {
        last = t
            .train_step(std::slice::from_ref(&data))
            .expect("step")
            .loss;
        if last < 0.05 {
            assert!(step > 5, "suspiciously fast: {step}");
            return;
        }
    }
    panic!("loss still {last} after 300 steps");
}

#[test]
fn hand_written_and_autograd_trainers_follow_the_same_run() {
    // Dropout, padding and two micro-batches: the generator must be drawn in the same order
    // by both paths, step after step, for the runs to stay together.
    let cfg = common::micro_config(Architecture::Qwen2, true);
    let ids = common::random_ids(4, 8, cfg.vocab_size, 21);
    let pads = [0, 2, 1, 3];
    let halves = [
        batch(&ids.narrow(0, 0, 2).expect("rows"), &pads[..2], 1),
        batch(&ids.narrow(0, 2, 2).expect("rows"), &pads[2..], 1),
    ];
    let mut hand = trainer(&cfg, DType::F64, config(0.2));
    let mut auto = trainer(&cfg, DType::F64, config(0.2));
    auto.autograd = true;
    assert!(lmforge_model::backprop::supported(&hand.model));
    for _ in 0..4 {
        let a = hand.train_step(&halves).expect("hand-written step");
        let b = auto.train_step(&halves).expect("autograd step");
        assert!((a.loss - b.loss).abs() < 1e-10, "{} vs {}", a.loss, b.loss);
        assert!((a.grad_norm - b.grad_norm).abs() < 1e-9 * b.grad_norm);
    }
    for ((name, va), (_, vb)) in hand.optimizer.vars.iter().zip(&auto.optimizer.vars) {
        let d = common::max_abs_diff(va.as_tensor(), vb.as_tensor());
        assert!(d < 1e-9, "{name} differs by {d}");
    }
}
