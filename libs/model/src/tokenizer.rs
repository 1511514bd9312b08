//! Tokenizers: load a Hugging Face `tokenizer.json`, train a byte-level BPE for models made
//! from scratch, and save both in the layout `transformers` reads (`tokenizer.json` plus a
//! `tokenizer_config.json` carrying the special tokens and the chat template).

use std::path::Path;

use serde_json::{Value, json};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{ModelError, Result};
use crate::hf::read_json;
use crate::stopping::Detokenize;

/// A token's `start..end` byte range in the encoded text.
pub type ByteSpan = (usize, usize);

/// A tokenizer with the special tokens and chat template from `tokenizer_config.json`.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    pub inner: Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// `chat_template` from `tokenizer_config.json`, when set.
    pub chat_template: Option<String>,
}

fn tok_err(e: impl std::fmt::Display) -> ModelError {
    ModelError::Tokenizer(e.to_string())
}

/// A special-token entry of `tokenizer_config.json`: a string or `{"content": …}`.
fn special(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TextTokenizer {
    /// Load `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| {
            ModelError::Tokenizer(format!("{}: {e}", dir.join("tokenizer.json").display()))
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() {
            read_json(&cfg_path)?
        } else {
            json!({})
        };
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take the default one.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        // transformers 5 writes the template to its own file instead of the config.
        let jinja = dir.join("chat_template.jinja");
        let chat_template = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
        } else {
            chat_template
        };
        Ok(Self {
            inner,
            bos_token: special(&cfg, "bos_token"),
            eos_token: special(&cfg, "eos_token"),
            pad_token: special(&cfg, "pad_token"),
            chat_template,
        })
    }

    /// Train a byte-level BPE (GPT-2 style: any text encodes, nothing is unknown) on
    /// `corpus`. `special_tokens` get the first ids, e.g. `["<pad>", "<s>", "</s>"]`; the
    /// second and third, when given, become BOS and EOS.
    pub fn train_byte_level_bpe<S: AsRef<str> + Send>(
        corpus: impl Iterator<Item = S> + Send,
        vocab_size: usize,
        special_tokens: &[&str],
    ) -> Result<Self> {
        let specials: Vec<AddedToken> = special_tokens
            .iter()
            .map(|s| AddedToken::from(*s, true))
            .collect();
        let trainer = BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials.clone())
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build();
        let mut trainer = tokenizers::models::TrainerWrapper::from(trainer);
        let mut inner = Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevel::default()));
        inner.train(&mut trainer, corpus).map_err(tok_err)?;
        inner.add_special_tokens(&specials);
        let pick = |i: usize| special_tokens.get(i).map(|s| s.to_string());
        Ok(Self {
            inner,
            pad_token: pick(0),
            bos_token: pick(1),
            eos_token: pick(2),
            chat_template: None,
        })
    }

    /// Token ids of `text` (`add_special_tokens` adds BOS etc. per the post-processor).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)
            .map_err(tok_err)?
            .get_ids()
            .to_vec())
    }

    /// Token ids of `text` with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Vec<ByteSpan>)> {
        let enc = self.inner.encode(text, false).map_err(tok_err)?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Write `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        self.inner
            .save(dir.join("tokenizer.json"), true)
            .map_err(tok_err)?;
        let mut cfg = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": false,
            "model_max_length": 1_000_000_000_000_000_000u64,
        });
        for (key, val) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
        ] {
            if let Some(v) = val {
                cfg[key] = json!(v);
            }
        }
        if let Some(t) = &self.chat_template {
            cfg["chat_template"] = json!(t);
            // Both places, so transformers 4 (config) and 5 (separate file) read the same one.
            let jinja = dir.join("chat_template.jinja");
            std::fs::write(&jinja, t).map_err(|e| ModelError::io(&jinja, e))?;
        }
        let path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&cfg).map_err(|e| ModelError::json(&path, e))?;
        std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))
    }
}

impl Detokenize for TextTokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let lines = [
            "用户：你好，请介绍一下你自己。",
            "助手：你好！我是一个语言模型，很高兴为你服务。",
            "The quick brown fox jumps over the lazy dog.",
            "Training a tokenizer on a small corpus is quick.",
        ];
        (0..20)
            .flat_map(|_| lines.iter().map(|s| s.to_string()))
            .collect()
    }

    #[test]
    fn trained_byte_level_bpe_round_trips_any_text_and_saves() {
        let tok = TextTokenizer::train_byte_level_bpe(
            corpus().into_iter(),
            400,
            &["<pad>", "<s>", "</s>"],
        )
        .expect("train");
        assert_eq!(tok.token_id("<pad>"), Some(0));
        assert_eq!(tok.eos_token_id(), Some(2));
        // Merges were learned: a frequent phrase takes fewer tokens than bytes.
        let seen = "你好，我是一个语言模型";
        assert!(tok.encode(seen, false).expect("enc").len() < seen.len() / 2);
        // Unseen characters still encode (byte fallback) and decode exactly.
        for text in [
            seen,
            "全新的句子 with émojis 🚀 and\nnewlines",
            "The lazy dog.",
        ] {
            let ids = tok.encode(text, false).expect("enc");
            assert_eq!(tok.decode(&ids).expect("dec"), text);
        }
        let dir = std::env::temp_dir().join(format!("lmforge-tok-{}", std::process::id()));
        let mut with_template = tok.clone();
        with_template.chat_template = Some("{{ messages }}".into());
        with_template.save(&dir).expect("save");
        let back = TextTokenizer::from_dir(&dir).expect("load");
        assert_eq!(
            back.encode(seen, false).expect("enc"),
            tok.encode(seen, false).expect("enc")
        );
        assert_eq!(back.chat_template.as_deref(), Some("{{ messages }}"));
        assert_eq!(back.eos_token.as_deref(), Some("</s>"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
