//! The starting point of a run: base weights, tokenizer and chat template, then the
//! [`Trainer`] over the weights the method trains.
//!
//! Frozen weights (the whole base under LoRA, `frozen_modules` under full fine-tuning) are
//! detached in the model, so backward never computes their gradients.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use lmforge_model::chat::{CHATML, ChatTemplate};
use lmforge_model::config::Architecture;
use lmforge_model::hf;
use lmforge_model::lora::LoraWeights;
use lmforge_model::model::Model;
use lmforge_model::tokenizer::TextTokenizer;
use lmforge_model::train::{TrainConfig, Trainer};
use lmforge_model::{ModelConfig, weights};
use lmforge_proto::v1 as pb;
use serde_json::Value;

use super::BaseModel;
use super::data::Record;
use super::error::RunError;
use super::settings::{Method, Settings};

/// Special tokens of a trained tokenizer when the spec lists none.
pub const DEFAULT_SPECIAL_TOKENS: [&str; 5] =
    ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"];

/// Where a checkpoint keeps a tokenizer trained by the run, so a resumed run reuses it.
pub const CHECKPOINT_TOKENIZER_DIR: &str = "tokenizer";

/// Base weights and tokenizer, before the method is applied.
pub struct Prepared {
    pub config: ModelConfig,
    /// All weights as HF-named vars (base, base with an adapter merged, or random init).
    pub weights: VarMap,
    /// With `chat_template` set to the template the run renders chats with.
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    /// Directory whose tokenizer files are copied into the output; `None` when the run
    /// trained its tokenizer (it is saved instead).
    pub tokenizer_dir: Option<PathBuf>,
    /// Whether the tokenizer was trained by this job (it goes into checkpoints).
    pub trained_tokenizer: bool,
    pub generation_config: Option<Value>,
    /// `base_model_name_or_path` for a PEFT adapter.
    pub base_name: String,
    /// The adapter merged into `weights` when the base is an adapter version (a new
    /// unmerged adapter is stacked onto it, see `output`).
    pub base_adapter: Option<LoraWeights>,
}

fn load_hf(dir: &Path, dtype: DType, device: &Device) -> Result<hf::HfCheckpoint, RunError> {
    hf::load_checkpoint(dir, dtype, device).map_err(|e| RunError::base(dir, e))
}

fn tokenizer_from(dir: &Path) -> Result<TextTokenizer, RunError> {
    TextTokenizer::from_dir(dir).map_err(|e| RunError::base(dir, e))
}

/// The model's own template, or ChatML when it has none.
fn with_template(mut tok: TextTokenizer) -> (TextTokenizer, ChatTemplate) {
    let source = tok
        .chat_template
        .clone()
        .unwrap_or_else(|| CHATML.to_string());
    tok.chat_template = Some(source.clone());
    let template = ChatTemplate::new(&source, &tok);
    (tok, template)
}

fn check_vocab(tok: &TextTokenizer, cfg: &ModelConfig, dir: &Path) -> Result<(), RunError> {
    if tok.vocab_size() > cfg.vocab_size {
        return Err(RunError::base(
            dir,
            format!(
                "tokenizer has {} tokens, the model's vocab_size is {}",
                tok.vocab_size(),
                cfg.vocab_size
            ),
        ));
    }
    Ok(())
}

/// Load or create the base for `base`; `resume_from` supplies a tokenizer trained earlier.
pub fn prepare(
    base: &BaseModel,
    dtype: DType,
    device: &Device,
    seed: u64,
    train: &[(usize, Record)],
    resume_from: Option<&Path>,
) -> Result<Prepared, RunError> {
    match base {
        BaseModel::Hf { dir } => {
            let ckpt = load_hf(dir, dtype, device)?;
            let (tokenizer, template) = with_template(tokenizer_from(dir)?);
            check_vocab(&tokenizer, &ckpt.config, dir)?;
            Ok(Prepared {
                config: ckpt.config,
                weights: ckpt.weights,
                tokenizer,
                template,
                tokenizer_dir: Some(dir.clone()),
                trained_tokenizer: false,
                generation_config: ckpt.generation_config,
                base_name: dir.display().to_string(),
                base_adapter: None,
            })
        }
        BaseModel::Adapter {
            base_dir,
            adapter_dir,
        } => {
            let ckpt = load_hf(base_dir, dtype, device)?;
            let adapter = LoraWeights::load_peft(adapter_dir, &ckpt.config, dtype, device)
                .map_err(|e| RunError::base(adapter_dir, e))?;
            let merged = adapter.merge_into(&ckpt.config, &ckpt.weights)?;
            // An adapter version may carry its own tokenizer (e.g. a changed chat template).
            let tok_dir = if adapter_dir.join("tokenizer.json").is_file() {
                adapter_dir
            } else {
                base_dir
            };
            let (tokenizer, template) = with_template(tokenizer_from(tok_dir)?);
            check_vocab(&tokenizer, &ckpt.config, tok_dir)?;
            Ok(Prepared {
                config: ckpt.config,
                weights: merged,
                tokenizer,
                template,
                tokenizer_dir: Some(tok_dir.clone()),
                trained_tokenizer: false,
                generation_config: ckpt.generation_config,
                base_name: base_dir.display().to_string(),
                base_adapter: Some(adapter),
            })
        }
        BaseModel::FromScratch {
            config,
            tokenizer_dir,
        } => from_scratch(
            config,
            tokenizer_dir.as_deref(),
            dtype,
            device,
            seed,
            train,
            resume_from,
        ),
    }
}

fn from_scratch(
    spec: &pb::FromScratch,
    tokenizer_dir: Option<&Path>,
    dtype: DType,
    device: &Device,
    seed: u64,
    train: &[(usize, Record)],
    resume_from: Option<&Path>,
) -> Result<Prepared, RunError> {
    let source = spec
        .tokenizer
        .as_ref()
        .and_then(|t| t.source.as_ref())
        .ok_or_else(|| RunError::invalid("from_scratch.tokenizer", "required"))?;
    let saved = resume_from
        .map(|d| d.join(CHECKPOINT_TOKENIZER_DIR))
        .filter(|d| d.join("tokenizer.json").is_file());
    let (tokenizer, template, tokenizer_dir, trained) = match source {
        pb::tokenizer_spec::Source::FromModel(name) => {
            let dir = tokenizer_dir.ok_or_else(|| {
                RunError::invalid(
                    "from_scratch.tokenizer.from_model",
                    format!("the directory of `{name}` was not provided"),
                )
            })?;
            let (tok, template) = with_template(tokenizer_from(dir)?);
            (tok, template, Some(dir.to_path_buf()), false)
        }
        pb::tokenizer_spec::Source::Train(t) => {
            let tok = match saved {
                // BPE training is not promised to be deterministic: reuse the checkpoint's.
                Some(dir) => {
                    TextTokenizer::from_dir(&dir).map_err(|e| RunError::checkpoint(&dir, e))?
                }
                None => train_tokenizer(t, train)?,
            };
            let (tok, template) = with_template(tok);
            (tok, template, None, true)
        }
    };
    let config = scratch_config(spec.architecture.as_ref(), &tokenizer)?;
    let weights = weights::init_weights(&config, dtype, device, seed)?;
    Ok(Prepared {
        config,
        weights,
        tokenizer,
        template,
        tokenizer_dir,
        trained_tokenizer: trained,
        generation_config: None,
        base_name: String::new(),
        base_adapter: None,
    })
}

fn train_tokenizer(
    t: &pb::TokenizerTraining,
    train: &[(usize, Record)],
) -> Result<TextTokenizer, RunError> {
    let field = "from_scratch.tokenizer.train";
    match pb::TokenizerAlgorithm::try_from(t.algorithm) {
        Ok(pb::TokenizerAlgorithm::Unspecified | pb::TokenizerAlgorithm::ByteLevelBpe) => {}
        _ => {
            return Err(RunError::invalid(
                &format!("{field}.algorithm"),
                "only byte-level BPE is supported",
            ));
        }
    }
    let vocab_size = t.vocab_size.unwrap_or(32_000);
    if !(256..=262_144).contains(&vocab_size) {
        return Err(RunError::invalid(
            &format!("{field}.vocab_size"),
            "must be in 256–262144",
        ));
    }
    if t.min_frequency.is_some_and(|f| f != 2) {
        return Err(RunError::invalid(
            &format!("{field}.min_frequency"),
            "only the default of 2 is supported",
        ));
    }
    let specials: Vec<&str> = if t.special_tokens.is_empty() {
        DEFAULT_SPECIAL_TOKENS.to_vec()
    } else {
        t.special_tokens.iter().map(String::as_str).collect()
    };
    let source = if t.chat_template.is_empty() {
        CHATML.to_string()
    } else {
        t.chat_template.clone()
    };
    // Train on the text the model will see: chats rendered with the template being stored.
    let pick = |i: usize| specials.get(i).map(|s| s.to_string()).unwrap_or_default();
    let template = ChatTemplate {
        source: source.clone(),
        bos_token: pick(1),
        eos_token: pick(2),
    };
    let corpus = train
        .iter()
        .map(|(line, r)| {
            r.render(&template).map_err(|m| {
                RunError::invalid(
                    &format!("{field}.chat_template"),
                    format!("line {line}: {m}"),
                )
            })
        })
        .collect::<Result<Vec<String>, RunError>>()?;
    let mut tok =
        TextTokenizer::train_byte_level_bpe(corpus.into_iter(), vocab_size as usize, &specials)?;
    tok.chat_template = Some(source);
    Ok(tok)
}

fn scratch_config(
    a: Option<&pb::ArchitectureConfig>,
    tok: &TextTokenizer,
) -> Result<ModelConfig, RunError> {
    let a = a.ok_or_else(|| RunError::invalid("from_scratch.architecture", "required"))?;
    let f = |name: &str| format!("from_scratch.architecture.{name}");
    let architecture = match a.architecture.as_str() {
        "llama" => Architecture::Llama,
        "mistral" => Architecture::Mistral,
        "qwen2" => Architecture::Qwen2,
        other => {
            return Err(RunError::invalid(
                &f("architecture"),
                format!("`{other}` is not one of llama, mistral, qwen2"),
            ));
        }
    };
    let positive = |v: u32, name: &str| {
        if v == 0 {
            Err(RunError::invalid(&f(name), "must be > 0"))
        } else {
            Ok(v as usize)
        }
    };
    let hidden = positive(a.hidden_size, "hidden_size")?;
    let heads = positive(a.num_attention_heads, "num_attention_heads")?;
    if hidden % heads != 0 {
        return Err(RunError::invalid(
            &f("hidden_size"),
            "must be divisible by num_attention_heads",
        ));
    }
    let kv = if a.num_key_value_heads == 0 {
        heads
    } else {
        a.num_key_value_heads as usize
    };
    if heads % kv != 0 {
        return Err(RunError::invalid(
            &f("num_key_value_heads"),
            "must divide num_attention_heads",
        ));
    }
    let tok_vocab = tok.vocab_size();
    let vocab_size = match a.vocab_size as usize {
        0 => tok_vocab,
        v if v < tok_vocab => {
            return Err(RunError::invalid(
                &f("vocab_size"),
                format!("{v} is smaller than the tokenizer's {tok_vocab} tokens"),
            ));
        }
        v => v,
    };
    // Chat models stop at the end of an assistant turn as well as at EOS.
    let mut eos_token_ids: Vec<u32> = tok.eos_token_id().into_iter().collect();
    if let Some(end) = tok.token_id("<|im_end|>")
        && !eos_token_ids.contains(&end)
    {
        eos_token_ids.push(end);
    }
    let config = ModelConfig {
        architecture,
        vocab_size,
        hidden_size: hidden,
        intermediate_size: positive(a.intermediate_size, "intermediate_size")?,
        num_hidden_layers: positive(a.num_hidden_layers, "num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: hidden / heads,
        rms_norm_eps: if a.rms_norm_eps > 0.0 {
            a.rms_norm_eps
        } else {
            1e-6
        },
        rope_theta: if a.rope_theta > 0.0 {
            a.rope_theta
        } else {
            10_000.0
        },
        rope_scaling: None,
        max_position_embeddings: positive(a.max_position_embeddings, "max_position_embeddings")?,
        tie_word_embeddings: a.tie_word_embeddings,
        attention_bias: architecture == Architecture::Qwen2,
        sliding_window: None,
        bos_token_id: tok.bos_token.as_deref().and_then(|t| tok.token_id(t)),
        eos_token_ids,
    };
    config
        .validate()
        .map_err(|e| RunError::invalid("from_scratch.architecture", e.to_string()))?;
    Ok(config)
}

/// Whether `pattern` (dot-separated, `*` matching one segment) names a part of `name`:
/// `embed_tokens` matches `model.embed_tokens.weight`, `layers.0` matches every tensor of
/// layer 0 but not of layer 10.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let pat: Vec<&str> = pattern.trim_matches('.').split('.').collect();
    let segs: Vec<&str> = name.split('.').collect();
    pat.len() <= segs.len()
        && segs
            .windows(pat.len())
            .any(|w| w.iter().zip(&pat).all(|(s, p)| *p == "*" || s == p))
}

/// Every weight tensor of `model` with its HF name (a tied `lm_head` answers to the
/// embedding's name).
fn visit_params(model: &mut Model, mut f: impl FnMut(&str, &mut Tensor)) {
    f("model.embed_tokens.weight", &mut model.embed);
    let tied = model.config.tie_word_embeddings;
    for (l, layer) in model.layers.iter_mut().enumerate() {
        let p = format!("model.layers.{l}");
        f(
            &format!("{p}.input_layernorm.weight"),
            &mut layer.input_norm,
        );
        f(
            &format!("{p}.post_attention_layernorm.weight"),
            &mut layer.post_norm,
        );
        for (block, name, proj) in [
            ("self_attn", "q_proj", &mut layer.q),
            ("self_attn", "k_proj", &mut layer.k),
            ("self_attn", "v_proj", &mut layer.v),
            ("self_attn", "o_proj", &mut layer.o),
            ("mlp", "gate_proj", &mut layer.gate),
            ("mlp", "up_proj", &mut layer.up),
            ("mlp", "down_proj", &mut layer.down),
        ] {
            f(&format!("{p}.{block}.{name}.weight"), &mut proj.weight);
            if let Some(b) = proj.bias.as_mut() {
                f(&format!("{p}.{block}.{name}.bias"), b);
            }
        }
    }
    f("model.norm.weight", &mut model.norm);
    let head = if tied {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    };
    f(head, &mut model.lm_head.weight);
}

/// The trainer for `prepared` under `settings`, and the LoRA adapters when the method is LoRA.
pub fn build_trainer(
    prepared: &Prepared,
    settings: &Settings,
    train_config: TrainConfig,
) -> Result<(Trainer, Option<LoraWeights>), RunError> {
    let mut model = Model::new(&prepared.config, &prepared.weights)?;
    let all = weights::sorted_vars(&prepared.weights);
    let (trainable, lora) = match &settings.method {
        Method::Full { frozen } => {
            for p in frozen {
                if !all.iter().any(|(n, _)| pattern_matches(p, n)) {
                    return Err(RunError::invalid(
                        "method.full.frozen_modules",
                        format!("`{p}` matches no weight of the model"),
                    ));
                }
            }
            let is_frozen = |n: &str| frozen.iter().any(|p| pattern_matches(p, n));
            let trainable: Vec<_> = all.into_iter().filter(|(n, _)| !is_frozen(n)).collect();
            if trainable.is_empty() {
                return Err(RunError::invalid(
                    "method.full.frozen_modules",
                    "every weight is frozen",
                ));
            }
            visit_params(&mut model, |n, t| {
                if is_frozen(n) {
                    *t = t.detach();
                }
            });
            (trainable, None)
        }
        Method::Lora { config, .. } => {
            visit_params(&mut model, |_, t| *t = t.detach());
            let dtype = model.dtype();
            let lora = LoraWeights::init(
                &prepared.config,
                config.clone(),
                dtype,
                model.device(),
                settings.seed,
            )?;
            lora.attach(&mut model)?;
            (lora.trainable_vars(), Some(lora))
        }
    };
    Ok((Trainer::new(model, trainable, train_config)?, lora))
}

#[cfg(test)]
mod tests {
    use super::pattern_matches;

    #[test]
    fn patterns_match_whole_segments() {
        assert!(pattern_matches("embed_tokens", "model.embed_tokens.weight"));
        assert!(pattern_matches(
            "layers.0",
            "model.layers.0.mlp.up_proj.weight"
        ));
        assert!(!pattern_matches(
            "layers.0",
            "model.layers.10.mlp.up_proj.weight"
        ));
        assert!(pattern_matches(
            "layers.*.mlp",
            "model.layers.3.mlp.up_proj.weight"
        ));
        assert!(!pattern_matches("embed", "model.embed_tokens.weight"));
    }
}
