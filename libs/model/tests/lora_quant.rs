//! LoRA (only adapters train; PEFT names and layout; merged = base + adapter) and q8_0
//! serving weights (logit error against f32 measured).

mod common;

use candle_core::{DType, Device, Tensor};
use lmforge_model::lora::{LoraConfig, LoraWeights};
use lmforge_model::optim::{AdamWConfig, LrSchedule};
use lmforge_model::train::{Batch, TrainConfig, Trainer};
use lmforge_model::{Architecture, Model, ModelConfig, quant, weights};

fn lora_config() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    }
}

fn batch(cfg: &ModelConfig) -> Batch {
    let ids = common::random_ids(2, 8, cfg.vocab_size, 3);
    Batch {
        attention_mask: Tensor::ones((2, 8), DType::U32, &Device::Cpu).expect("ones"),
        label_mask: Tensor::ones((2, 8), DType::F32, &Device::Cpu).expect("ones"),
        input_ids: ids,
    }
}

#[test]
fn lora_trains_only_adapters_and_saves_peft_layout() {
    let cfg = common::micro_config(Architecture::Llama, false);
    let base = common::random_weights(&cfg, DType::F32, 1, 0.2);
    let before: Vec<Tensor> = weights::sorted_vars(&base)
        .iter()
        .map(|(_, v)| v.as_tensor().copy().expect("copy"))
        .collect();
    let lora = LoraWeights::init(&cfg, lora_config(), DType::F32, &Device::Cpu, 9).expect("init");
    let mut model = Model::new(&cfg, &base).expect("model");
    lora.attach(&mut model).expect("attach");
    let tc = TrainConfig {
        schedule: LrSchedule::constant(1e-2),
        adamw: AdamWConfig::default(),
        max_grad_norm: None,
        dropout: 0.0,
        seed: 1,
    };
    let mut trainer = Trainer::new(model, lora.trainable_vars(), tc).expect("trainer");
    let data = batch(&cfg);
    let first = trainer
        .train_step(std::slice::from_ref(&data))
        .expect("step")
        .loss;
    let mut last = first;
    for _ in 0..10 {
        last = trainer
            .train_step(std::slice::from_ref(&data))
            .expect("step")
            .loss;
    }
    assert!(last < first, "adapters should learn: {first} -> {last}");
    for ((name, v), b) in weights::sorted_vars(&base).iter().zip(&before) {
        assert_eq!(
            common::max_abs_diff(v.as_tensor(), b),
            0.0,
            "base tensor {name} changed"
        );
    }
    let b_name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    assert!(
        weights::get(&lora.map, b_name)
            .expect("peft name")
            .abs()
            .expect("abs")
            .sum_all()
            .expect("sum")
            .to_scalar::<f32>()
            .expect("s")
            > 0.0
    );

    let dir = std::env::temp_dir().join(format!("lmforge-peft-{}", std::process::id()));
    lora.save_peft(&dir, "tiny-base").expect("save");
    let cfg_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("adapter_config.json")).expect("read"),
    )
    .expect("json");
    assert_eq!(
        (cfg_json["r"].as_u64(), cfg_json["peft_type"].as_str()),
        (Some(4), Some("LORA"))
    );
    let saved = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
        .expect("read");
    assert!(saved.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"));
    assert_eq!(saved.len(), 2 * 3 * cfg.num_hidden_layers);
    let back = LoraWeights::load_peft(&dir, &cfg, DType::F32, &Device::Cpu).expect("load");
    assert_eq!(back.config, lora.config);
    for ((n, a), (_, b)) in lora.trainable_vars().iter().zip(back.trainable_vars()) {
        assert_eq!(
            common::max_abs_diff(a.as_tensor(), b.as_tensor()),
            0.0,
            "{n}"
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn lora_dropout_is_active_in_training_even_without_model_dropout() {
    let cfg = common::micro_config(Architecture::Llama, false);
    let base = common::random_weights(&cfg, DType::F32, 1, 0.2);
    let first_loss = |dropout: f32| {
        let lcfg = LoraConfig {
            dropout,
            ..lora_config()
        };
        let lora = LoraWeights::init(&cfg, lcfg, DType::F32, &Device::Cpu, 9).expect("init");
        for (name, v) in lora.trainable_vars() {
            if name.contains("lora_B") {
                v.set(&(v.ones_like().expect("ones") * 0.5).expect("scale"))
                    .expect("set");
            }
        }
        let mut model = Model::new(&cfg, &base).expect("model");
        lora.attach(&mut model).expect("attach");
        let tc = TrainConfig {
            schedule: LrSchedule::constant(1e-3),
            adamw: AdamWConfig::default(),
            max_grad_norm: None,
            dropout: 0.0,
            seed: 1,
        };
        let mut t = Trainer::new(model, lora.trainable_vars(), tc).expect("trainer");
        t.train_step(std::slice::from_ref(&batch(&cfg)))
            .expect("step")
            .loss
    };
    assert_ne!(first_loss(0.5), first_loss(0.0));
}

#[test]
fn merged_weights_equal_base_plus_adapter() {
    let cfg = common::micro_config(Architecture::Qwen2, true);
    let base = common::random_weights(&cfg, DType::F32, 2, 0.2);
    let lora = LoraWeights::init(&cfg, lora_config(), DType::F32, &Device::Cpu, 4).expect("init");
    // Give B non-zero values so the adapter actually changes the model.
    for (name, v) in lora.trainable_vars() {
        if name.contains("lora_B") {
            v.set(&Tensor::randn(0f32, 0.3, v.shape(), &Device::Cpu).expect("randn"))
                .expect("set");
        }
    }
    let merged = lora.merge_into(&cfg, &base).expect("merge");
    let w = "model.layers.1.self_attn.v_proj.weight";
    let a = weights::get(
        &lora.map,
        "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight",
    )
    .expect("A");
    let b = weights::get(
        &lora.map,
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight",
    )
    .expect("B");
    let want = (weights::get(&base, w).expect("w")
        + (b.matmul(&a).expect("BA") * 2.0).expect("scale"))
    .expect("add");
    assert!(common::max_abs_diff(&weights::get(&merged, w).expect("merged"), &want) < 1e-6);

    let ids = common::random_ids(1, 7, cfg.vocab_size, 8);
    let mut adapted = Model::new(&cfg, &base).expect("model");
    lora.attach(&mut adapted).expect("attach");
    let with_adapter = adapted.forward_train(&ids, None, None).expect("fwd");
    let plain = Model::new(&cfg, &base)
        .expect("model")
        .forward_train(&ids, None, None)
        .expect("fwd");
    let folded = Model::new(&cfg, &merged)
        .expect("model")
        .forward_train(&ids, None, None)
        .expect("fwd");
    assert!(common::max_abs_diff(&with_adapter, &folded) < 1e-5);
    assert!(
        common::max_abs_diff(&with_adapter, &plain) > 1e-3,
        "adapter had no effect"
    );
}

#[test]
fn q8_0_logit_error_against_f32_is_small() {
    let mut cfg = common::micro_config(Architecture::Llama, false);
    cfg.hidden_size = 64;
    cfg.head_dim = 16;
    cfg.intermediate_size = 128;
    cfg.vocab_size = 96;
    let map = common::random_weights(&cfg, DType::F32, 3, 0.05);
    let f32_model = Model::new(&cfg, &map).expect("model");
    let mut q_model = f32_model.clone();
    let n = quant::quantize_q8_0(&mut q_model).expect("quantize");
    assert_eq!(n, 7 * cfg.num_hidden_layers + 1);
    let tokens: Vec<u32> = common::random_tokens(12, cfg.vocab_size, 4);
    let run = |m: &Model| common::prefill_logits(m, &tokens);
    let (exact, approx) = (run(&f32_model), run(&q_model));
    let err = common::max_abs_diff(&exact, &approx);
    let scale = exact
        .abs()
        .expect("abs")
        .max_all()
        .expect("max")
        .to_scalar::<f32>()
        .expect("s") as f64;
    println!(
        "q8_0 max |logit error| = {err:.3e} (max |logit| {scale:.3e}, relative {:.3e})",
        err / scale
    );
    assert!(err > 0.0, "quantized weights were not used");
    // Serving drops the float copies of the quantized weights; the forward is unchanged.
    let full: u64 = map
        .all_vars()
        .iter()
        .map(|v| (v.elem_count() * 4) as u64)
        .sum();
    let mut lean = q_model.clone();
    let held = quant::release_float_weights(&mut lean).expect("release");
    assert_eq!(lean.layers[0].q.weight.elem_count(), 0);
    assert!(held < full / 2, "{held} bytes held of {full} f32 bytes");
    assert_eq!(
        run(&lean).to_vec2::<f32>().expect("logits"),
        approx.to_vec2::<f32>().expect("logits")
    );
    assert_eq!(quant::quantize_q8_0(&mut lean).expect("again"), n);
    assert!(
        err / scale < 0.05,
        "q8_0 relative logit error {} too large",
        err / scale
    );
}
