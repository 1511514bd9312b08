//! Shared helpers for the integration tests: micro configs and random data.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use lmforge_model::infer::SeqInput;
use lmforge_model::kv_cache::{BlockTable, PagedKvCache};
use lmforge_model::{Architecture, Model, ModelConfig, Rng, weights};

/// A model small enough for finite differences and for many steps in a second.
pub fn micro_config(arch: Architecture, tied: bool) -> ModelConfig {
    ModelConfig {
        architecture: arch,
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 64,
        tie_word_embeddings: tied,
        attention_bias: arch == Architecture::Qwen2,
        sliding_window: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Weights where every tensor (norms and biases included) is random, so no gradient is
/// trivially zero or symmetric.
pub fn random_weights(cfg: &ModelConfig, dtype: DType, seed: u64, std: f64) -> VarMap {
    let map = weights::init_weights(cfg, dtype, &Device::Cpu, seed).expect("init");
    let mut rng = Rng::new(seed ^ 0xabcdef);
    for (name, var) in weights::sorted_vars(&map) {
        let n = var.elem_count();
        let base = if name.ends_with("norm.weight") {
            1.0
        } else {
            0.0
        };
        let data: Vec<f64> = (0..n).map(|_| base + rng.normal() * std).collect();
        let t = Tensor::from_vec(data, var.shape(), &Device::Cpu)
            .expect("shape matches")
            .to_dtype(dtype)
            .expect("cast");
        var.set(&t).expect("same shape");
    }
    map
}

/// `[b, t]` random token ids below `vocab`.
pub fn random_ids(b: usize, t: usize, vocab: usize, seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let ids: Vec<u32> = (0..b * t).map(|_| rng.below(vocab) as u32).collect();
    Tensor::from_vec(ids, (b, t), &Device::Cpu).expect("shape matches")
}

/// `t` random token ids below `vocab`, as a plain list (one sequence's tokens).
pub fn random_tokens(t: usize, vocab: usize, seed: u64) -> Vec<u32> {
    random_ids(1, t, vocab, seed)
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("u32 ids")
}

/// Last-token logits of `tokens` prefilled as one sequence into a fresh cache (blocks of 4).
pub fn prefill_logits(model: &Model, tokens: &[u32]) -> Tensor {
    let blocks = tokens.len().div_ceil(4);
    let mut cache =
        PagedKvCache::new(&model.config, blocks, 4, DType::F32, &Device::Cpu).expect("cache");
    let mut table = BlockTable::default();
    model
        .forward_batch(
            &mut cache,
            &mut [SeqInput {
                tokens,
                table: &mut table,
            }],
        )
        .expect("prefill")
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).expect("cast") - b.to_dtype(DType::F64).expect("cast"))
        .expect("same shape")
        .abs()
        .expect("abs")
        .flatten_all()
        .expect("flatten")
        .max(0)
        .expect("max")
        .to_scalar::<f64>()
        .expect("scalar")
}
