//! LoRA adapters: init, attach to a [`Model`], save/load in the PEFT layout, merge for export.
//!
//! Adapter tensors are named as PEFT names them
//! (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) in their own
//! [`VarMap`], so the trainer is handed only those vars and the base stays frozen.
//! `adapter_config.json` carries rank, alpha, dropout and target modules.

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::hf::read_json;
use crate::linear::{LoraAdapter, Proj};
use crate::model::Model;
use crate::rng::Rng;
use crate::weights::{self, read_safetensors, sorted_vars, write_safetensors};

/// Adapter hyper-parameters (PEFT's `r`, `lora_alpha`, `lora_dropout`, `target_modules`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    #[serde(rename = "r")]
    pub rank: usize,
    #[serde(rename = "lora_alpha")]
    pub alpha: f64,
    #[serde(rename = "lora_dropout", default)]
    pub dropout: f32,
    /// Projection names: any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj.
    pub target_modules: Vec<String>,
}

const MODULES: [(&str, &str); 7] = [
    ("q_proj", "self_attn"),
    ("k_proj", "self_attn"),
    ("v_proj", "self_attn"),
    ("o_proj", "self_attn"),
    ("gate_proj", "mlp"),
    ("up_proj", "mlp"),
    ("down_proj", "mlp"),
];

/// Trainable adapter weights with PEFT names.
pub struct LoraWeights {
    pub config: LoraConfig,
    pub map: VarMap,
}

impl std::fmt::Debug for LoraWeights {
    // VarMap has no Debug; list the tensor count instead of the tensors.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraWeights")
            .field("config", &self.config)
            .field("tensors", &self.map.all_vars().len())
            .finish()
    }
}

fn module_path(layer: usize, module: &str) -> Result<String> {
    let (_, block) = MODULES.iter().find(|(m, _)| *m == module).ok_or_else(|| {
        ModelError::input("target_modules", format!("unknown projection `{module}`"))
    })?;
    Ok(format!("model.layers.{layer}.{block}.{module}"))
}

/// PEFT's name for an adapter matrix (`which` is `lora_A` or `lora_B`).
pub fn peft_name(layer: usize, module: &str, which: &str) -> Result<String> {
    Ok(format!(
        "base_model.model.{}.{which}.weight",
        module_path(layer, module)?
    ))
}

fn proj_mut<'m>(model: &'m mut Model, layer: usize, module: &str) -> &'m mut Proj {
    let l = &mut model.layers[layer];
    match module {
        "q_proj" => &mut l.q,
        "k_proj" => &mut l.k,
        "v_proj" => &mut l.v,
        "o_proj" => &mut l.o,
        "gate_proj" => &mut l.gate,
        "up_proj" => &mut l.up,
        _ => &mut l.down,
    }
}

impl LoraWeights {
    /// Fresh adapters: A uniform in ±1/√in (PEFT's kaiming-uniform bound), B zero, so the
    /// adapted model starts equal to the base.
    pub fn init(
        model: &ModelConfig,
        config: LoraConfig,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Self> {
        let specs = weights::param_specs(model);
        let mut rng = Rng::new(seed);
        let map = VarMap::new();
        {
            let mut data = map
                .data()
                .lock()
                .expect("a fresh VarMap's mutex is not poisoned");
            for layer in 0..model.num_hidden_layers {
                for m in &config.target_modules {
                    let wname = format!("{}.weight", module_path(layer, m)?);
                    let spec = specs
                        .iter()
                        .find(|s| s.name == wname)
                        .ok_or_else(|| ModelError::MissingTensor(wname.clone()))?;
                    let (out, inp) = (spec.shape[0], spec.shape[1]);
                    let bound = 1.0 / (inp as f64).sqrt();
                    let a: Vec<f32> = (0..config.rank * inp)
                        .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                        .collect();
                    let a = Tensor::from_vec(a, (config.rank, inp), device)?.to_dtype(dtype)?;
                    let b = Tensor::zeros((out, config.rank), dtype, device)?;
                    data.insert(peft_name(layer, m, "lora_A")?, Var::from_tensor(&a)?);
                    data.insert(peft_name(layer, m, "lora_B")?, Var::from_tensor(&b)?);
                }
            }
        }
        Ok(Self { config, map })
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.config.alpha / self.config.rank as f64
    }

    /// Add the adapters to `model`'s projections (replacing any already attached).
    pub fn attach(&self, model: &mut Model) -> Result<()> {
        for layer in 0..model.layers.len() {
            for m in &self.config.target_modules {
                let adapter = LoraAdapter {
                    a: weights::get(&self.map, &peft_name(layer, m, "lora_A")?)?,
                    b: weights::get(&self.map, &peft_name(layer, m, "lora_B")?)?,
                    scale: self.scale(),
                    dropout: self.config.dropout,
                };
                proj_mut(model, layer, m).lora = Some(adapter);
            }
        }
        Ok(())
    }

    /// The adapter vars, the only ones a LoRA run trains.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        sorted_vars(&self.map)
    }

    /// Write `adapter_config.json` and `adapter_model.safetensors`.
    pub fn save_peft(&self, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let cfg = json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model_name_or_path,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": self.config.target_modules,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
        });
        let path = dir.join("adapter_config.json");
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| ModelError::json(&path, e))?;
        std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))?;
        let tensors: Vec<(String, Tensor)> = sorted_vars(&self.map)
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        write_safetensors(&tensors, &dir.join("adapter_model.safetensors"))
    }

    /// Load a PEFT adapter directory for a base model with `model` config.
    pub fn load_peft(
        dir: &Path,
        model: &ModelConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let path = dir.join("adapter_config.json");
        let config: LoraConfig =
            serde_json::from_value(read_json(&path)?).map_err(|e| ModelError::json(&path, e))?;
        let mut tensors = read_safetensors(&dir.join("adapter_model.safetensors"))?;
        let map = VarMap::new();
        {
            let mut data = map
                .data()
                .lock()
                .expect("a fresh VarMap's mutex is not poisoned");
            for layer in 0..model.num_hidden_layers {
                for m in &config.target_modules {
                    for which in ["lora_A", "lora_B"] {
                        let name = peft_name(layer, m, which)?;
                        let t = tensors
                            .remove(&name)
                            .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
                        let rank_dim = if which == "lora_A" { 0 } else { 1 };
                        if t.rank() != 2 || t.dim(rank_dim)? != config.rank {
                            return Err(ModelError::WrongShape {
                                name,
                                expected: vec![config.rank],
                                actual: t.dims().to_vec(),
                            });
                        }
                        data.insert(
                            name,
                            Var::from_tensor(&t.to_dtype(dtype)?.to_device(device)?)?,
                        );
                    }
                }
            }
        }
        Ok(Self { config, map })
    }

    /// Base weights with the adapters folded in (`W + scale · B A`), ready for HF export.
    pub fn merge_into(&self, model: &ModelConfig, base: &VarMap) -> Result<VarMap> {
        let merged = VarMap::new();
        {
            let mut data = merged
                .data()
                .lock()
                .expect("a fresh VarMap's mutex is not poisoned");
            for (name, var) in sorted_vars(base) {
                data.insert(name, Var::from_tensor(&var.as_tensor().copy()?)?);
            }
            for layer in 0..model.num_hidden_layers {
                for m in &self.config.target_modules {
                    let wname = format!("{}.weight", module_path(layer, m)?);
                    let a = weights::get(&self.map, &peft_name(layer, m, "lora_A")?)?;
                    let b = weights::get(&self.map, &peft_name(layer, m, "lora_B")?)?;
                    let w = data
                        .get(&wname)
                        .ok_or_else(|| ModelError::MissingTensor(wname.clone()))?;
                    let delta = (b.matmul(&a)? * self.scale())?.to_dtype(w.dtype())?;
                    w.set(&(w.as_tensor() + delta)?)?;
                }
            }
        }
        Ok(merged)
    }
}
