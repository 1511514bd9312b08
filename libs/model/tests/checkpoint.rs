//! Hugging Face checkpoint directories: save → load is bit-exact (single file and sharded),
//! tokenizer files travel along, and broken checkpoints name the offending tensor.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lmforge_model::hf::{load_checkpoint, save_checkpoint, save_sharded_weights};
use lmforge_model::{Architecture, ModelError, weights};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lmforge-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    d
}

fn assert_bit_exact(a: &candle_nn::VarMap, b: &candle_nn::VarMap) {
    let (va, vb) = (weights::sorted_vars(a), weights::sorted_vars(b));
    assert_eq!(
        va.iter().map(|v| &v.0).collect::<Vec<_>>(),
        vb.iter().map(|v| &v.0).collect::<Vec<_>>()
    );
    for ((name, x), (_, y)) in va.iter().zip(&vb) {
        let x = x
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        let y = y
            .flatten_all()
            .expect("flat")
            .to_vec1::<f32>()
            .expect("vec");
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{name} differs"
        );
    }
}

#[test]
fn save_then_load_is_bit_exact_with_tokenizer_files() {
    for (arch, tied) in [(Architecture::Qwen2, false), (Architecture::Llama, true)] {
        let cfg = common::micro_config(arch, tied);
        let map = common::random_weights(&cfg, DType::F32, 5, 0.5);
        let src = tmp("tok-src");
        std::fs::create_dir_all(&src).expect("mkdir");
        std::fs::write(src.join("tokenizer.json"), "{}").expect("write");
        std::fs::write(
            src.join("tokenizer_config.json"),
            r#"{"chat_template":"x"}"#,
        )
        .expect("write");
        let dir = tmp("ckpt");
        save_checkpoint(&dir, &cfg, &map, None, Some(&src)).expect("save");
        for f in [
            "config.json",
            "model.safetensors",
            "generation_config.json",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(dir.join(f).exists(), "{f} missing");
        }
        let back = load_checkpoint(&dir, DType::F32, &Device::Cpu).expect("load");
        assert_eq!(back.config, cfg);
        assert_bit_exact(&map, &back.weights);
        let names = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .expect("read");
        assert_eq!(names.contains_key("lm_head.weight"), !tied);
        assert!(names.contains_key("model.layers.1.self_attn.q_proj.weight"));
        assert_eq!(
            names.contains_key("model.layers.0.self_attn.k_proj.bias"),
            arch == Architecture::Qwen2
        );
        assert_eq!(back.generation_config.expect("written")["eos_token_id"], 2);
        std::fs::remove_dir_all(&dir).ok();
        std::fs::remove_dir_all(&src).ok();
    }
}

#[test]
fn sharded_checkpoint_loads_bit_exact() {
    let cfg = common::micro_config(Architecture::Llama, false);
    let map = common::random_weights(&cfg, DType::F32, 6, 0.5);
    let dir = tmp("sharded");
    save_checkpoint(&dir, &cfg, &map, None, None).expect("save");
    std::fs::remove_file(dir.join("model.safetensors")).expect("rm");
    save_sharded_weights(&dir, &cfg, &map, 5).expect("shards");
    assert!(dir.join("model-00001-of-00005.safetensors").exists());
    let back = load_checkpoint(&dir, DType::F32, &Device::Cpu).expect("load");
    assert_bit_exact(&map, &back.weights);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_tensor_and_wrong_shape_are_named() {
    let cfg = common::micro_config(Architecture::Llama, false);
    let map = common::random_weights(&cfg, DType::F32, 7, 0.5);
    let mut tensors: std::collections::HashMap<String, Tensor> = weights::sorted_vars(&map)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    let name = "model.layers.1.mlp.up_proj.weight".to_string();
    let up = tensors.remove(&name).expect("present");
    let Err(err) = weights::varmap_from_tensors(&cfg, tensors.clone(), DType::F32, &Device::Cpu)
    else {
        panic!("a missing tensor must fail");
    };
    assert!(
        matches!(&err, ModelError::MissingTensor(n) if *n == name),
        "{err}"
    );
    tensors.insert(name.clone(), up.t().expect("t").contiguous().expect("c"));
    let Err(err) = weights::varmap_from_tensors(&cfg, tensors, DType::F32, &Device::Cpu) else {
        panic!("a wrong shape must fail");
    };
    assert!(
        err.to_string().contains(&name) && err.to_string().contains("[24, 16]"),
        "{err}"
    );

    let dir = tmp("badarch");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("config.json"),
        r#"{"architectures":["MambaForCausalLM"]}"#,
    )
    .expect("write");
    let err = load_checkpoint(&dir, DType::F32, &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("MambaForCausalLM"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
