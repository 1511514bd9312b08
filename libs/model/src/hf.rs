//! Hugging Face checkpoint directories: load and save the `transformers` layout.
//!
//! A directory holds `config.json`, the weights (`model.safetensors`, or shards listed in
//! `model.safetensors.index.json`), and optionally `generation_config.json`, `tokenizer.json`,
//! `tokenizer_config.json`, `special_tokens_map.json` and `chat_template.jinja`. [`load_checkpoint`] reads one;
//! [`save_checkpoint`] writes one that `transformers` and [`load_checkpoint`] both read.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarMap;
use serde_json::{Value, json};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::weights;

/// Tokenizer-side files copied along with a checkpoint.
pub const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// A loaded checkpoint directory.
pub struct HfCheckpoint {
    pub config: ModelConfig,
    pub weights: VarMap,
    /// `generation_config.json`, when present.
    pub generation_config: Option<Value>,
    /// Where it was loaded from (tokenizer files are read from here).
    pub dir: PathBuf,
}

impl std::fmt::Debug for HfCheckpoint {
    // VarMap has no Debug; list the tensor count instead of the tensors.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfCheckpoint")
            .field("config", &self.config)
            .field("tensors", &self.weights.all_vars().len())
            .field("dir", &self.dir)
            .finish()
    }
}

/// Read and parse a JSON file.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::json(path, e))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| ModelError::json(path, e))?;
    std::fs::write(path, text).map_err(|e| ModelError::io(path, e))
}

/// Load `config.json` and the weights of the checkpoint in `dir`.
pub fn load_checkpoint(dir: &Path, dtype: DType, device: &Device) -> Result<HfCheckpoint> {
    let cfg_path = dir.join("config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let config = ModelConfig::from_hf_json(&text)?;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let tensors = if single.exists() {
        weights::read_safetensors(&single)?
    } else if index.exists() {
        let idx = read_json(&index)?;
        let map = idx
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::Checkpoint {
                path: index.clone(),
                reason: "no `weight_map` object".into(),
            })?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        let mut all = HashMap::new();
        for f in files {
            all.extend(weights::read_safetensors(&dir.join(f))?);
        }
        all
    } else {
        return Err(ModelError::Checkpoint {
            path: dir.to_path_buf(),
            reason: "neither model.safetensors nor model.safetensors.index.json".into(),
        });
    };
    let weights = weights::varmap_from_tensors(&config, tensors, dtype, device)?;
    let gen_path = dir.join("generation_config.json");
    let generation_config = if gen_path.exists() {
        Some(read_json(&gen_path)?)
    } else {
        None
    };
    Ok(HfCheckpoint {
        config,
        weights,
        generation_config,
        dir: dir.to_path_buf(),
    })
}

/// The `generation_config.json` implied by a config's special tokens.
pub fn default_generation_config(cfg: &ModelConfig) -> Value {
    let mut v = json!({ "_from_model_config": true });
    if let Some(bos) = cfg.bos_token_id {
        v["bos_token_id"] = json!(bos);
    }
    if !cfg.eos_token_ids.is_empty() {
        v["eos_token_id"] = if cfg.eos_token_ids.len() == 1 {
            json!(cfg.eos_token_ids[0])
        } else {
            json!(cfg.eos_token_ids)
        };
    }
    v
}

/// Write a checkpoint directory: config, single-file weights, generation config, and the
/// tokenizer files found in `tokenizer_dir` (if given).
pub fn save_checkpoint(
    dir: &Path,
    config: &ModelConfig,
    weights: &VarMap,
    generation_config: Option<&Value>,
    tokenizer_dir: Option<&Path>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    write_json(&dir.join("config.json"), &config.to_hf_json())?;
    // Only the tensors the config defines, so a tied model never writes `lm_head.weight`.
    let names: BTreeSet<String> = weights::param_specs(config)
        .into_iter()
        .map(|s| s.name)
        .collect();
    let tensors = names
        .iter()
        .map(|n| Ok((n.clone(), weights::get(weights, n)?)))
        .collect::<Result<Vec<_>>>()?;
    weights::write_safetensors(&tensors, &dir.join("model.safetensors"))?;
    let gen_cfg = generation_config
        .cloned()
        .unwrap_or_else(|| default_generation_config(config));
    write_json(&dir.join("generation_config.json"), &gen_cfg)?;
    if let Some(src) = tokenizer_dir {
        for f in TOKENIZER_FILES {
            let from = src.join(f);
            if from.exists() && src != dir {
                std::fs::copy(&from, dir.join(f)).map_err(|e| ModelError::io(&from, e))?;
            }
        }
    }
    Ok(())
}

/// Write `weights` as shards of at most `max_tensors_per_shard` tensors plus the index, the
/// layout `transformers` uses for large models.
pub fn save_sharded_weights(
    dir: &Path,
    config: &ModelConfig,
    weights: &VarMap,
    max_tensors_per_shard: usize,
) -> Result<()> {
    let specs = weights::param_specs(config);
    let chunks: Vec<_> = specs.chunks(max_tensors_per_shard.max(1)).collect();
    let n = chunks.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, chunk) in chunks.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        let tensors = chunk
            .iter()
            .map(|s| Ok((s.name.clone(), weights::get(weights, &s.name)?)))
            .collect::<Result<Vec<_>>>()?;
        for (name, t) in &tensors {
            total += t.elem_count() * t.dtype().size_in_bytes();
            weight_map.insert(name.clone(), json!(file));
        }
        weights::write_safetensors(&tensors, &dir.join(&file))?;
    }
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total}, "weight_map": weight_map}),
    )
}
