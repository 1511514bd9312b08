//! Model weights under their Hugging Face tensor names, held in a candle [`VarMap`].
//!
//! [`param_specs`] lists every tensor a config needs (`model.embed_tokens.weight`,
//! `model.layers.N.self_attn.q_proj.weight`, …, `lm_head.weight` unless tied);
//! [`init_weights`] fills a fresh [`VarMap`] from a seed; [`load_safetensors`] and
//! [`save_safetensors`] move weights to and from `.safetensors` files, checking every name and
//! shape. Vars are trainable: the optimizer updates them in place and the model, which holds
//! clones of the same tensors, sees the new values.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::rng::Rng;

/// How a parameter is initialised for a model made from scratch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal(0, 0.02), the `transformers` default `initializer_range`.
    Normal,
    Ones,
    Zeros,
}

/// One parameter: its HF name, shape and initialiser.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

/// Every tensor a model with `cfg` has, in a stable order.
pub fn param_specs(cfg: &ModelConfig) -> Vec<ParamSpec> {
    let (h, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q = cfg.num_attention_heads * cfg.head_dim;
    let kv = cfg.num_key_value_heads * cfg.head_dim;
    let p = |name: String, shape: &[usize], init| ParamSpec {
        name,
        shape: shape.to_vec(),
        init,
    };
    let mut out = vec![p("model.embed_tokens.weight".into(), &[v, h], Init::Normal)];
    for l in 0..cfg.num_hidden_layers {
        let pre = format!("model.layers.{l}");
        out.push(p(format!("{pre}.input_layernorm.weight"), &[h], Init::Ones));
        for (name, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            out.push(p(
                format!("{pre}.self_attn.{name}.weight"),
                &[rows, h],
                Init::Normal,
            ));
            if cfg.attention_bias {
                out.push(p(
                    format!("{pre}.self_attn.{name}.bias"),
                    &[rows],
                    Init::Zeros,
                ));
            }
        }
        out.push(p(
            format!("{pre}.self_attn.o_proj.weight"),
            &[h, q],
            Init::Normal,
        ));
        out.push(p(
            format!("{pre}.post_attention_layernorm.weight"),
            &[h],
            Init::Ones,
        ));
        out.push(p(
            format!("{pre}.mlp.gate_proj.weight"),
            &[f, h],
            Init::Normal,
        ));
        out.push(p(
            format!("{pre}.mlp.up_proj.weight"),
            &[f, h],
            Init::Normal,
        ));
        out.push(p(
            format!("{pre}.mlp.down_proj.weight"),
            &[h, f],
            Init::Normal,
        ));
    }
    out.push(p("model.norm.weight".into(), &[h], Init::Ones));
    if !cfg.tie_word_embeddings {
        out.push(p("lm_head.weight".into(), &[v, h], Init::Normal));
    }
    out
}

fn random_tensor(shape: &[usize], init: Init, std: f64, rng: &mut Rng) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = match init {
        Init::Normal => (0..n).map(|_| (rng.normal() * std) as f32).collect(),
        Init::Ones => vec![1.0; n],
        Init::Zeros => vec![0.0; n],
    };
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// Fresh weights for `cfg`, determined by `seed` (normal(0, 0.02), norms at one, biases zero).
pub fn init_weights(cfg: &ModelConfig, dtype: DType, device: &Device, seed: u64) -> Result<VarMap> {
    let mut rng = Rng::new(seed);
    let map = VarMap::new();
    {
        let mut data = map
            .data()
            .lock()
            .expect("a fresh VarMap's mutex is not poisoned");
        for spec in param_specs(cfg) {
            let t = random_tensor(&spec.shape, spec.init, 0.02, &mut rng)?
                .to_dtype(dtype)?
                .to_device(device)?;
            data.insert(spec.name, Var::from_tensor(&t)?);
        }
    }
    Ok(map)
}

/// Check `tensors` against `cfg`'s specs and turn them into trainable vars.
///
/// Extra tensors (e.g. `rotary_emb.inv_freq` in old checkpoints, or a duplicate `lm_head`
/// in tied ones) are ignored; a missing tensor or a wrong shape is an error naming it.
pub fn varmap_from_tensors(
    cfg: &ModelConfig,
    mut tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<VarMap> {
    let map = VarMap::new();
    {
        let mut data = map
            .data()
            .lock()
            .expect("a fresh VarMap's mutex is not poisoned");
        for spec in param_specs(cfg) {
            let t = tensors
                .remove(&spec.name)
                .ok_or_else(|| ModelError::MissingTensor(spec.name.clone()))?;
            if t.dims() != spec.shape.as_slice() {
                return Err(ModelError::WrongShape {
                    name: spec.name,
                    expected: spec.shape,
                    actual: t.dims().to_vec(),
                });
            }
            let t = t.to_dtype(dtype)?.to_device(device)?;
            data.insert(spec.name, Var::from_tensor(&t)?);
        }
    }
    Ok(map)
}

/// Read every tensor of one `.safetensors` file (on the CPU; callers move them).
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(ModelError::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        ));
    }
    crate::mmap::read_safetensors(path)
}

/// Write `tensors` to `path` with the `{"format": "pt"}` metadata `transformers` checks.
pub fn write_safetensors(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?.to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    safetensors::serialize_to_file(
        contiguous.iter().map(|(n, t)| (n.as_str(), t)),
        Some(meta),
        path,
    )
    .map_err(|e| ModelError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The vars of `map`, sorted by name so every walk over them is in a stable order.
pub fn sorted_vars(map: &VarMap) -> Vec<(String, Var)> {
    let data = map
        .data()
        .lock()
        .expect("VarMap mutex is only held briefly, never across a panic");
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Save all of `map` into one safetensors file.
pub fn save_safetensors(map: &VarMap, path: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = sorted_vars(map)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().clone()))
        .collect();
    write_safetensors(&tensors, path)
}

/// The tensor named `name` in `map`.
pub fn get(map: &VarMap, name: &str) -> Result<Tensor> {
    let data = map
        .data()
        .lock()
        .expect("VarMap mutex is only held briefly, never across a panic");
    data.get(name)
        .map(|v| v.as_tensor().clone())
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
}
