//! The trained model as the registry stores it: an HF checkpoint directory (full, merged
//! LoRA, from scratch) or a PEFT adapter directory, each with the tokenizer files and the
//! chat template the run trained with.
//!
//! A new adapter trained on top of an adapter version applies to base + old adapter, which
//! no registered version holds; so it is written stacked with the old one into a single
//! adapter of the base (ranks concatenated), whose parent is the old adapter's parent.

use std::path::Path;

use candle_core::Tensor;
use candle_nn::VarMap;
use lmforge_model::hf::{self, TOKENIZER_FILES};
use lmforge_model::lora::{LoraConfig, LoraWeights, peft_name};
use lmforge_model::{ModelConfig, weights};
use lmforge_proto::v1 as pb;
use serde_json::{Value, json};

use super::error::RunError;
use super::setup::Prepared;

/// Write the output into `dir` (replacing anything there) and return its format.
pub fn write(
    dir: &Path,
    prepared: &Prepared,
    lora: Option<&LoraWeights>,
    merge: bool,
) -> Result<pb::ModelFormat, RunError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| RunError::io(dir, e))?;
    }
    let format = match lora {
        Some(lora) if !merge => {
            match &prepared.base_adapter {
                Some(old) => stack_adapters(&prepared.config, old, lora)?
                    .save_peft(dir, &prepared.base_name)?,
                None => lora.save_peft(dir, &prepared.base_name)?,
            }
            pb::ModelFormat::PeftLora
        }
        Some(lora) => {
            let merged = lora.merge_into(&prepared.config, &prepared.weights)?;
            save_hf(dir, prepared, &merged)?;
            pb::ModelFormat::HfSafetensors
        }
        None => {
            save_hf(dir, prepared, &prepared.weights)?;
            pb::ModelFormat::HfSafetensors
        }
    };
    write_tokenizer(dir, prepared)?;
    Ok(format)
}

fn save_hf(dir: &Path, prepared: &Prepared, weights: &VarMap) -> Result<(), RunError> {
    hf::save_checkpoint(
        dir,
        &prepared.config,
        weights,
        prepared.generation_config.as_ref(),
        None,
    )?;
    Ok(())
}

/// Copy the base's tokenizer files (or save the trained tokenizer), making sure
/// `tokenizer_config.json` carries the chat template the run used.
fn write_tokenizer(dir: &Path, prepared: &Prepared) -> Result<(), RunError> {
    std::fs::create_dir_all(dir).map_err(|e| RunError::io(dir, e))?;
    let Some(src) = prepared.tokenizer_dir.as_deref() else {
        prepared.tokenizer.save(dir)?;
        return Ok(());
    };
    for f in TOKENIZER_FILES {
        let from = src.join(f);
        if from.is_file() {
            std::fs::copy(&from, dir.join(f)).map_err(|e| RunError::io(&from, e))?;
        }
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg = if cfg_path.is_file() {
        hf::read_json(&cfg_path)?
    } else {
        json!({ "tokenizer_class": "PreTrainedTokenizerFast" })
    };
    let has_template = cfg.get("chat_template").is_some_and(|v| !v.is_null())
        || dir.join("chat_template.jinja").is_file();
    if !has_template && let Value::Object(obj) = &mut cfg {
        obj.insert(
            "chat_template".into(),
            json!(prepared.tokenizer.chat_template),
        );
        let text = serde_json::to_string_pretty(&cfg)
            .map_err(|e| RunError::Internal(format!("serializing tokenizer config: {e}")))?;
        std::fs::write(&cfg_path, text).map_err(|e| RunError::io(&cfg_path, e))?;
    }
    Ok(())
}

/// One adapter of the base equal to `old` then `new`: `ΔW = s_o·B_o·A_o + s_n·B_n·A_n =
/// [s_o·B_o, s_n·B_n]·[A_o; A_n]`, so ranks add and scale 1 (alpha = rank); a module only one
/// of them adapts gets zero blocks from the other.
pub fn stack_adapters(
    cfg: &ModelConfig,
    old: &LoraWeights,
    new: &LoraWeights,
) -> Result<LoraWeights, RunError> {
    let rank = old.config.rank + new.config.rank;
    let mut modules = old.config.target_modules.clone();
    for m in &new.config.target_modules {
        if !modules.contains(m) {
            modules.push(m.clone());
        }
    }
    let map = VarMap::new();
    {
        let mut data = map
            .data()
            .lock()
            .expect("a fresh VarMap's mutex is not poisoned");
        for layer in 0..cfg.num_hidden_layers {
            for m in &modules {
                let (a_name, b_name) = (
                    peft_name(layer, m, "lora_A")?,
                    peft_name(layer, m, "lora_B")?,
                );
                // (A, scaled B) of each adapter, or None where it leaves the module alone.
                let parts = [old, new].map(|w| -> Result<Option<(Tensor, Tensor)>, RunError> {
                    if !w.config.target_modules.contains(m) {
                        return Ok(None);
                    }
                    let a = weights::get(&w.map, &a_name)?;
                    let b = (weights::get(&w.map, &b_name)? * w.scale())?;
                    Ok(Some((a, b)))
                });
                let [o, n] = parts;
                let (o, n) = (o?, n?);
                let (a_like, b_like) = o
                    .as_ref()
                    .or(n.as_ref())
                    .expect("the module comes from one of the adapters");
                let (inp, out) = (a_like.dim(1)?, b_like.dim(0)?);
                let block = |p: &Option<(Tensor, Tensor)>,
                             r: usize|
                 -> Result<(Tensor, Tensor), RunError> {
                    Ok(match p {
                        Some((a, b)) => (a.clone(), b.clone()),
                        None => (
                            Tensor::zeros((r, inp), a_like.dtype(), a_like.device())?,
                            Tensor::zeros((out, r), b_like.dtype(), b_like.device())?,
                        ),
                    })
                };
                let (ao, bo) = block(&o, old.config.rank)?;
                let (an, bn) = block(&n, new.config.rank)?;
                let a = Tensor::cat(&[ao, an], 0)?;
                let b = Tensor::cat(&[bo, bn], 1)?;
                data.insert(a_name, candle_core::Var::from_tensor(&a)?);
                data.insert(b_name, candle_core::Var::from_tensor(&b)?);
            }
        }
    }
    Ok(LoraWeights {
        config: LoraConfig {
            rank,
            alpha: rank as f64,
            dropout: new.config.dropout,
            target_modules: modules,
        },
        map,
    })
}
