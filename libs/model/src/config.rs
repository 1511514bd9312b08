//! Model configuration: parse and write Hugging Face `config.json` for the llama family.
//!
//! [`ModelConfig::from_hf_json`] picks the [`Architecture`] from `architectures` (falling back
//! to `model_type`) and reads the shape fields; [`ModelConfig::to_hf_json`] writes a file that
//! `transformers` loads. [`ModelConfig::tiny`] and [`ModelConfig::small`] are the benchmark
//! shapes from `shared/BENCH.md`.

use serde_json::{Value, json};

use crate::error::{ModelError, Result};

/// Which Hugging Face model class the weights follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    /// Qwen2: like Llama, plus biases on the q/k/v projections.
    Qwen2,
}

impl Architecture {
    /// The `architectures[0]` string `transformers` expects.
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
        }
    }
    /// The `model_type` string `transformers` expects.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
        }
    }
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" | "llama" => Some(Self::Llama),
            "MistralForCausalLM" | "mistral" => Some(Self::Mistral),
            "Qwen2ForCausalLM" | "qwen2" => Some(Self::Qwen2),
            _ => None,
        }
    }
}

/// Rotary-embedding frequency scaling (`rope_scaling` in `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, smooth in between.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor`.
    Linear { factor: f64 },
}

/// Everything the model code needs to know about a checkpoint's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (always on for Qwen2, `attention_bias` for Llama).
    pub attention_bias: bool,
    /// Mistral's sliding attention window; `None` attends to the whole context.
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

fn field<'a>(v: &'a Value, name: &'static str) -> Result<&'a Value> {
    v.get(name)
        .filter(|x| !x.is_null())
        .ok_or(ModelError::InvalidConfig {
            field: name,
            reason: "missing".into(),
        })
}

fn usize_field(v: &Value, name: &'static str) -> Result<usize> {
    field(v, name)?
        .as_u64()
        .map(|x| x as usize)
        .ok_or(ModelError::InvalidConfig {
            field: name,
            reason: "not a non-negative integer".into(),
        })
}

fn opt_usize(v: &Value, name: &'static str) -> Result<Option<usize>> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(_) => usize_field(v, name).map(Some),
    }
}

fn opt_f64(v: &Value, name: &'static str) -> Result<Option<f64>> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x.as_f64().map(Some).ok_or(ModelError::InvalidConfig {
            field: name,
            reason: "not a number".into(),
        }),
    }
}

fn token_ids(v: &Value, name: &'static str) -> Result<Vec<u32>> {
    let bad = || ModelError::InvalidConfig {
        field: name,
        reason: "not a token id or list of token ids".into(),
    };
    match v.get(name) {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(xs)) => xs
            .iter()
            .map(|x| x.as_u64().map(|x| x as u32).ok_or_else(bad))
            .collect(),
        Some(x) => Ok(vec![x.as_u64().ok_or_else(bad)? as u32]),
    }
}

fn parse_rope_scaling(v: &Value) -> Result<Option<RopeScaling>> {
    let bad = |reason: String| ModelError::InvalidConfig {
        field: "rope_scaling",
        reason,
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let factor = || opt_f64(v, "factor")?.ok_or_else(|| bad("`factor` missing".into()));
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear { factor: factor()? })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: factor()?,
            low_freq_factor: opt_f64(v, "low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: opt_f64(v, "high_freq_factor")?.unwrap_or(4.0),
            original_max_position_embeddings: opt_usize(v, "original_max_position_embeddings")?
                .unwrap_or(8192),
        })),
        other => Err(bad(format!("unsupported rope type `{other}`"))),
    }
}

impl ModelConfig {
    /// Parse the text of a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text).map_err(|e| ModelError::InvalidConfig {
            field: "config.json",
            reason: e.to_string(),
        })?;
        let name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .or_else(|| v.get("model_type").and_then(Value::as_str))
            .ok_or(ModelError::InvalidConfig {
                field: "architectures",
                reason: "neither `architectures` nor `model_type` is set".into(),
            })?;
        let architecture = Architecture::from_name(name)
            .ok_or_else(|| ModelError::UnsupportedArchitecture(name.to_string()))?;
        let hidden_size = usize_field(&v, "hidden_size")?;
        let num_attention_heads = usize_field(&v, "num_attention_heads")?;
        let num_key_value_heads =
            opt_usize(&v, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim =
            opt_usize(&v, "head_dim")?.unwrap_or(hidden_size / num_attention_heads.max(1));
        // transformers 5 nests rope settings under `rope_parameters`; 4.x uses top-level keys.
        let rope_params = v.get("rope_parameters").filter(|x| x.is_object());
        let rope_theta = match rope_params {
            Some(p) => opt_f64(p, "rope_theta")?,
            None => None,
        }
        .or(opt_f64(&v, "rope_theta")?)
        .unwrap_or(10_000.0);
        let rope_scaling = match (rope_params, v.get("rope_scaling")) {
            (_, Some(s)) if s.is_object() => parse_rope_scaling(s)?,
            (Some(p), _) => parse_rope_scaling(p)?,
            _ => None,
        };
        let sliding_window = match architecture {
            Architecture::Mistral => opt_usize(&v, "sliding_window")?,
            // Qwen2 configs carry a window but only use it when `use_sliding_window` is set.
            Architecture::Qwen2 if v.get("use_sliding_window") == Some(&Value::Bool(true)) => {
                opt_usize(&v, "sliding_window")?
            }
            _ => None,
        };
        let cfg = Self {
            architecture,
            vocab_size: usize_field(&v, "vocab_size")?,
            hidden_size,
            intermediate_size: usize_field(&v, "intermediate_size")?,
            num_hidden_layers: usize_field(&v, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: opt_f64(&v, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize(&v, "max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            attention_bias: architecture == Architecture::Qwen2
                || v.get("attention_bias")
                    .and_then(Value::as_bool)
                    .unwrap_or(false),
            sliding_window,
            bos_token_id: token_ids(&v, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(&v, "eos_token_id")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check the shape invariants the model code relies on.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str| {
            Err(ModelError::InvalidConfig {
                field,
                reason: reason.into(),
            })
        };
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("num_attention_heads", "must be positive");
        }
        if self.sliding_window == Some(0) {
            return bad(
                "sliding_window",
                "must be positive (a token sees at least itself)",
            );
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(
                "num_key_value_heads",
                "must divide num_attention_heads (grouped-query attention)",
            );
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim == 0 {
            return bad(
                "head_dim",
                "must be even and positive for rotary embeddings",
            );
        }
        if self.vocab_size == 0 || self.hidden_size == 0 || self.num_hidden_layers == 0 {
            return bad(
                "hidden_size",
                "vocab, hidden size and layer count must be positive",
            );
        }
        Ok(())
    }

    /// A Hugging Face `config.json` value for this config.
    pub fn to_hf_json(&self) -> Value {
        let mut v = json!({
            "architectures": [self.architecture.hf_class()],
            "model_type": self.architecture.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": 0.02,
            "torch_dtype": "float32",
            "use_cache": true,
        });
        let obj = v
            .as_object_mut()
            .expect("json! of an object literal is an object");
        if self.architecture == Architecture::Llama {
            obj.insert("attention_bias".into(), json!(self.attention_bias));
            obj.insert("mlp_bias".into(), json!(false));
        }
        if self.architecture != Architecture::Llama {
            obj.insert("sliding_window".into(), json!(self.sliding_window));
            obj.insert(
                "use_sliding_window".into(),
                json!(self.sliding_window.is_some()),
            );
        }
        obj.insert(
            "rope_scaling".into(),
            match &self.rope_scaling {
                None => Value::Null,
                Some(RopeScaling::Linear { factor }) => {
                    json!({"rope_type": "linear", "factor": factor})
                }
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                }) => json!({
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings,
                }),
            },
        );
        if let Some(bos) = self.bos_token_id {
            obj.insert("bos_token_id".into(), json!(bos));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                obj.insert("eos_token_id".into(), json!(one));
            }
            many => {
                obj.insert("eos_token_id".into(), json!(many));
            }
        }
        v
    }

    /// BENCH.md `tiny`: 4096 vocab, hidden 256, 4 layers, 8 heads / 4 kv heads, ffn 688.
    pub fn tiny() -> Self {
        Self {
            architecture: Architecture::Llama,
            vocab_size: 4096,
            hidden_size: 256,
            intermediate_size: 688,
            num_hidden_layers: 4,
            num_attention_heads: 8,
            num_key_value_heads: 4,
            head_dim: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            max_position_embeddings: 1024,
            tie_word_embeddings: false,
            attention_bias: false,
            sliding_window: None,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        }
    }

    /// BENCH.md `small` (SmolLM-135M shape): 49152 vocab, hidden 576, 30 layers, tied.
    pub fn small() -> Self {
        Self {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            max_position_embeddings: 2048,
            tie_word_embeddings: true,
            ..Self::tiny()
        }
    }

    /// Number of parameters (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let bias = if self.attention_bias { q + 2 * kv } else { 0 };
        let layer = h * q + 2 * h * kv + q * h + bias + 3 * h * f + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_shapes_have_documented_parameter_counts() {
        // BENCH.md: tiny 5.0 M, small 134.5 M.
        assert_eq!(
            (ModelConfig::tiny().num_parameters() as f64 / 1e5).round(),
            50.0
        );
        assert_eq!(
            (ModelConfig::small().num_parameters() as f64 / 1e5).round(),
            1345.0
        );
    }

    #[test]
    fn parses_llama3_qwen2_and_mistral() {
        let llama = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":128256,"hidden_size":2048,
          "intermediate_size":8192,"num_hidden_layers":16,"num_attention_heads":32,
          "num_key_value_heads":8,"rms_norm_eps":1e-5,"rope_theta":500000.0,
          "rope_scaling":{"factor":32.0,"high_freq_factor":4.0,"low_freq_factor":1.0,
          "original_max_position_embeddings":8192,"rope_type":"llama3"},
          "max_position_embeddings":131072,"tie_word_embeddings":true,
          "bos_token_id":128000,"eos_token_id":[128001,128008,128009]}"#;
        let c = ModelConfig::from_hf_json(llama).expect("valid llama config");
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert!(
            matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0)
        );
        assert!(!c.attention_bias);
        let qwen = r#"{"architectures":["Qwen2ForCausalLM"],"vocab_size":100,"hidden_size":64,
          "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
          "num_key_value_heads":2,"sliding_window":4096,"use_sliding_window":false,"eos_token_id":7}"#;
        let q = ModelConfig::from_hf_json(qwen).expect("valid qwen2 config");
        assert!(q.attention_bias);
        assert_eq!(q.sliding_window, None);
        assert_eq!(q.eos_token_ids, vec![7]);
        let mistral = r#"{"model_type":"mistral","vocab_size":100,"hidden_size":64,
          "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"sliding_window":16}"#;
        let m = ModelConfig::from_hf_json(mistral).expect("valid mistral config");
        assert_eq!(
            (m.architecture, m.sliding_window, m.num_key_value_heads),
            (Architecture::Mistral, Some(16), 4)
        );
    }

    #[test]
    fn transformers5_rope_parameters_are_read() {
        let j = r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":8,
          "num_hidden_layers":1,"num_attention_heads":2,
          "rope_parameters":{"rope_type":"default","rope_theta":12345.0}}"#;
        assert_eq!(
            ModelConfig::from_hf_json(j).expect("valid").rope_theta,
            12345.0
        );
    }

    #[test]
    fn unknown_architecture_and_bad_fields_are_named() {
        let e = ModelConfig::from_hf_json(r#"{"architectures":["GPT2LMHeadModel"]}"#).unwrap_err();
        assert!(e.to_string().contains("GPT2LMHeadModel"), "{e}");
        let e = ModelConfig::from_hf_json(r#"{"model_type":"llama","vocab_size":10}"#).unwrap_err();
        assert!(e.to_string().contains("hidden_size"), "{e}");
        let e = ModelConfig::from_hf_json(
            r#"{"model_type":"llama","vocab_size":10,"hidden_size":8,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":3,"num_key_value_heads":2}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("num_key_value_heads"), "{e}");
    }

    #[test]
    fn a_sliding_window_of_zero_is_refused_by_name() {
        let mut c = ModelConfig::tiny();
        c.sliding_window = Some(0);
        let e = c.validate().expect_err("window 0");
        assert!(e.to_string().contains("sliding_window"), "{e}");
        c.sliding_window = Some(1);
        c.validate().expect("window 1");
    }

    #[test]
    fn hf_json_round_trips() {
        for mut c in [ModelConfig::tiny(), ModelConfig::small()] {
            c.rope_scaling = Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 512,
            });
            let text = c.to_hf_json().to_string();
            assert_eq!(
                ModelConfig::from_hf_json(&text).expect("own output parses"),
                c
            );
        }
    }
}
