//! Logits and tokenization equal Hugging Face `transformers` on committed fixtures (a tiny
//! random Llama with Llama-3 rope scaling, a tiny random Qwen2 with q/k/v biases and tied
//! embeddings), made by `scripts/model/make_fixtures.py`.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lmforge_model::chat::{ChatTemplate, Message};
use lmforge_model::hf::load_checkpoint;
use lmforge_model::infer::SeqInput;
use lmforge_model::kv_cache::{BlockTable, PagedKvCache};
use lmforge_model::stopping::Detokenize;
use lmforge_model::tokenizer::TextTokenizer;
use lmforge_model::{Architecture, Model};
use serde_json::Value;

fn fixture(name: &str) -> (PathBuf, Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    let text = std::fs::read_to_string(dir.join("expected.json")).expect("fixture committed");
    (dir, serde_json::from_str(&text).expect("valid json"))
}

fn u32s(v: &Value) -> Vec<Vec<u32>> {
    serde_json::from_value(v.clone()).expect("integer rows")
}

fn check(name: &str, arch: Architecture) {
    let (dir, want) = fixture(name);
    let ckpt = load_checkpoint(&dir, DType::F32, &Device::Cpu).expect("load fixture");
    assert_eq!(ckpt.config.architecture, arch);
    let model = Model::new(&ckpt.config, &ckpt.weights).expect("model");
    let ids = u32s(&want["input_ids"]);
    let mask = u32s(&want["attention_mask"]);
    let (b, t) = (ids.len(), ids[0].len());
    let ids_t = Tensor::new(ids.clone(), &Device::Cpu).expect("ids");
    let mask_t = Tensor::new(mask.clone(), &Device::Cpu).expect("mask");
    let logits = model
        .forward_train(&ids_t, Some(&mask_t), None)
        .expect("forward");
    let expected: Vec<Vec<Vec<f32>>> =
        serde_json::from_value(want["logits"].clone()).expect("logits");
    let got = logits.to_vec3::<f32>().expect("vec");
    let mut worst = 0f32;
    for r in 0..b {
        for p in 0..t {
            // Padding query rows have no defined output; only real tokens are compared.
            if mask[r][p] == 0 {
                continue;
            }
            for (x, y) in got[r][p].iter().zip(&expected[r][p]) {
                worst = worst.max((x - y).abs());
            }
        }
    }
    assert!(worst < 1e-4, "{name}: max |logit - transformers| = {worst}");

    // The serving forward agrees too (row 0 has no padding).
    let mut cache = PagedKvCache::new(&ckpt.config, 4, 4, DType::F32, &Device::Cpu).expect("cache");
    let mut table = BlockTable::default();
    let last = model
        .forward_batch(
            &mut cache,
            &mut [SeqInput {
                tokens: &ids[0],
                table: &mut table,
            }],
        )
        .expect("batched forward");
    let want_last = Tensor::new(expected[0][t - 1].as_slice(), &Device::Cpu).expect("row");
    assert!(common::max_abs_diff(&last.get(0).expect("row"), &want_last) < 1e-4);

    let tok = TextTokenizer::from_dir(&dir).expect("tokenizer");
    let sample = want["sample_text"].as_str().expect("text");
    let sample_ids: Vec<u32> = serde_json::from_value(want["sample_ids"].clone()).expect("ids");
    assert_eq!(tok.encode(sample, false).expect("encode"), sample_ids);
    assert_eq!(tok.decode(&sample_ids).expect("decode"), sample);
    let template = ChatTemplate::from_tokenizer(&tok).expect("fixture has a chat template");
    let text = template
        .render(&[Message::new("user", "你好")], true)
        .expect("render");
    assert_eq!(text, "用户：你好\n助手：");
}

#[test]
fn tiny_llama3_matches_transformers() {
    check("tiny-llama", Architecture::Llama);
}

#[test]
fn tiny_qwen2_matches_transformers() {
    check("tiny-qwen2", Architecture::Qwen2);
}

/// Writes each fixture back out through lmforge's saver into `$LMFORGE_EXPORT_DIR/<name>`,
/// for `scripts/model/check_export.py` to load with `transformers` (needs Python, so ignored).
#[test]
#[ignore = "needs Python transformers: run scripts/model/check_export.py"]
fn export_fixtures_for_transformers_check() {
    let out = PathBuf::from(std::env::var("LMFORGE_EXPORT_DIR").expect("set LMFORGE_EXPORT_DIR"));
    for name in ["tiny-llama", "tiny-qwen2"] {
        let (dir, _) = fixture(name);
        let ckpt = load_checkpoint(&dir, DType::F32, &Device::Cpu).expect("load fixture");
        lmforge_model::hf::save_checkpoint(
            &out.join(name),
            &ckpt.config,
            &ckpt.weights,
            None,
            None,
        )
        .expect("save");
        let tok = TextTokenizer::from_dir(&dir).expect("tokenizer");
        tok.save(&out.join(name)).expect("save tokenizer");
        if name == "tiny-llama" {
            // A LoRA adapter with non-zero B, and lmforge's own merge of it, for PEFT to check.
            let lcfg = lmforge_model::lora::LoraConfig {
                rank: 4,
                alpha: 8.0,
                dropout: 0.0,
                target_modules: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
            };
            let lora = lmforge_model::lora::LoraWeights::init(
                &ckpt.config,
                lcfg,
                DType::F32,
                &Device::Cpu,
                3,
            )
            .expect("init");
            for (n, v) in lora.trainable_vars() {
                if n.contains("lora_B") {
                    v.set(&Tensor::randn(0f32, 0.2, v.shape(), &Device::Cpu).expect("randn"))
                        .expect("set");
                }
            }
            lora.save_peft(&out.join("lora-adapter"), "tiny-llama")
                .expect("save adapter");
            let merged = lora.merge_into(&ckpt.config, &ckpt.weights).expect("merge");
            lmforge_model::hf::save_checkpoint(
                &out.join("lora-merged"),
                &ckpt.config,
                &merged,
                None,
                Some(&dir),
            )
            .expect("save merged");
        }
    }
}
