//! `lmforge bench serve --shape …` without `--inference`: a seeded random-weight checkpoint
//! of a BENCH.md shape in a temporary directory, the whole stack in this process on
//! ephemeral ports (its own Postgres schemas, dropped afterwards), the checkpoint imported
//! into the registry and loaded by the inference service.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, ensure};
use lmforge_model::ModelConfig;
use lmforge_model::tokenizer::TextTokenizer;
use lmforge_proto::v1 as pb;
use lmforge_runtime::args::{NatsArgs, PostgresArgs};
use serde_json::json;

use crate::model_cmd::{self, status_error};
use crate::stack::{Stack, StackOptions};

/// BENCH.md's model shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// 5.0 M parameters, vocab 4096.
    Tiny,
    /// The SmolLM-135M shape, 134.5 M parameters, vocab 49152.
    Small,
}

impl Shape {
    /// The model configuration.
    pub fn config(self) -> ModelConfig {
        match self {
            Self::Tiny => ModelConfig::tiny(),
            Self::Small => ModelConfig::small(),
        }
    }

    /// `tiny` or `small`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tiny => "tiny",
            Self::Small => "small",
        }
    }
}

/// Writes a checkpoint of `shape` with weights seeded by `seed` into `dir`: config, weights,
/// generation config and a byte-level BPE tokenizer covering the whole vocabulary. Blocking
/// (hundreds of MB for `small`): call it off the async runtime.
pub fn write_checkpoint(dir: &Path, shape: Shape, seed: u64) -> anyhow::Result<()> {
    use candle_core::{DType, Device};
    let config = shape.config();
    let weights = lmforge_model::weights::init_weights(&config, DType::F32, &Device::Cpu, seed)
        .context("initialising weights")?;
    lmforge_model::hf::save_checkpoint(dir, &config, &weights, None, None)
        .context("writing the checkpoint")?;
    write_tokenizer(dir, config.vocab_size)?;
    let tokenizer = TextTokenizer::from_dir(dir).context("reading the tokenizer back")?;
    ensure!(
        tokenizer.vocab_size() == config.vocab_size,
        "the tokenizer has {} tokens, the model {}",
        tokenizer.vocab_size(),
        config.vocab_size
    );
    Ok(())
}

/// GPT-2's byte → printable character map that byte-level BPE vocabularies are written in.
fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars = ['\0'; 256];
    let mut shifted = 0u32;
    for byte in 0..=255u8 {
        chars[byte as usize] = if printable(byte) {
            char::from(byte)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).expect("256..=324 are valid chars")
        };
    }
    chars
}

/// A byte-level BPE `tokenizer.json` with exactly `vocab_size` tokens, so that every id a
/// random model can emit decodes: `<pad>` `<s>` `</s>` (ids 0–2, BOS 1 and EOS 2 as in the
/// model config), the 256 byte tokens, then two-byte merges of the most common text bytes
/// first (letters, space, digits), so that text prompts tokenize roughly like real text.
/// Also `tokenizer_config.json` with the special tokens and a plain chat template.
pub fn write_tokenizer(dir: &Path, vocab_size: usize) -> anyhow::Result<()> {
    let chars = byte_chars();
    let specials = ["<pad>", "<s>", "</s>"];
    ensure!(
        vocab_size >= specials.len() + 256,
        "vocab {vocab_size} is too small for a byte-level tokenizer"
    );
    let mut vocab = serde_json::Map::new();
    for (id, token) in specials.iter().enumerate() {
        vocab.insert((*token).to_owned(), json!(id));
    }
    for c in chars {
        vocab.insert(c.to_string(), json!(vocab.len()));
    }
    // Byte priority for merges: lowercase, space, uppercase, digits, the rest.
    let mut order: Vec<u8> = (b'a'..=b'z').chain([b' ']).collect();
    order.extend((b'A'..=b'Z').chain(b'0'..=b'9'));
    order.extend(
        (0..=255u8)
            .filter(|b| !order.contains(b))
            .collect::<Vec<_>>(),
    );
    let mut merges = Vec::new();
    // Pairs by increasing rank sum: (0,0), (0,1), (1,0), (0,2), … over the priority order.
    'fill: for sum in 0..(2 * order.len() - 1) {
        for first in sum.saturating_sub(order.len() - 1)..=sum.min(order.len() - 1) {
            if vocab.len() == vocab_size {
                break 'fill;
            }
            let (a, b) = (
                chars[order[first] as usize],
                chars[order[sum - first] as usize],
            );
            vocab.insert(format!("{a}{b}"), json!(vocab.len()));
            merges.push(format!("{a} {b}"));
        }
    }
    ensure!(
        vocab.len() == vocab_size,
        "vocab {vocab_size} exceeds what two-byte merges can fill"
    );
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(id, token)| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": true, "use_regex": true});
    let bos = json!({"SpecialToken": {"id": "<s>", "type_id": 0}});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                     bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}},
        },
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges,
        },
    });
    let template = "{% for message in messages %}<|{{ message['role'] }}|>\n\
                    {{ message['content'] }}</s>\n{% endfor %}\
                    {% if add_generation_prompt %}<|assistant|>\n{% endif %}";
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1_000_000_000_000_000_000u64,
        "chat_template": template,
    });
    for (name, value) in [
        ("tokenizer.json", tokenizer),
        ("tokenizer_config.json", config),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(&value)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The stack running in this process with the benchmark model loaded.
#[derive(Debug)]
pub struct LocalStack {
    stack: Stack,
    postgres: PostgresArgs,
    schema_prefix: String,
    /// `http://…` of the inference service.
    pub inference_url: String,
    /// `name/version` of the loaded model.
    pub model_ref: String,
}

/// How to start the local stack.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Postgres of the stack.
    pub postgres: PostgresArgs,
    /// NATS of the stack.
    pub nats: NatsArgs,
    /// How long every service may take to report SERVING.
    pub ready_timeout: Duration,
    /// Quantization the model is loaded with.
    pub quantization: pb::Quantization,
}

impl LocalStack {
    /// Starts the stack, registers `checkpoint` as model `name` and loads it; on any failure
    /// the stack is stopped before the error is returned.
    pub async fn start(
        options: LocalOptions,
        checkpoint: &Path,
        name: &str,
    ) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let schema_prefix = format!("bench_{}_{nanos}", std::process::id());
        let mut stack = Stack::start(StackOptions {
            ephemeral: true,
            schema_prefix: Some(schema_prefix.clone()),
            probe_interval: Duration::from_millis(500),
            ..StackOptions::new(options.postgres.clone(), options.nats)
        })
        .await?;
        let mut local = match stack.wait_healthy(options.ready_timeout).await {
            Ok(()) => Self {
                inference_url: format!("http://{}", service(&stack, "inference")?),
                stack,
                postgres: options.postgres,
                schema_prefix,
                model_ref: String::new(),
            },
            Err(error) => {
                let _ = stack.shutdown().await;
                return Err(anyhow::Error::new(error)
                    .context("starting the stack (are Postgres and NATS up? `make services`)"));
            }
        };
        match local.load(checkpoint, name, options.quantization).await {
            Ok(model_ref) => {
                local.model_ref = model_ref;
                Ok(local)
            }
            Err(error) => {
                local.shutdown().await;
                Err(error)
            }
        }
    }

    async fn load(
        &self,
        checkpoint: &Path,
        name: &str,
        quantization: pb::Quantization,
    ) -> anyhow::Result<String> {
        let registry = format!("http://{}", service(&self.stack, "registry")?);
        let mut registry = model_cmd::connect(&registry).await?;
        let version = model_cmd::import(&mut registry, checkpoint, name, None, false)
            .await
            .context("importing the checkpoint into the registry")?;
        let model_ref = format!("{}/{}", version.model_name, version.version);
        let mut inference = crate::generate_cmd::connect(&self.inference_url).await?;
        let loaded = inference
            .load_model(pb::LoadModelRequest {
                model_ref: model_ref.clone(),
                quantization: quantization as i32,
                set_default: true,
                ..Default::default()
            })
            .await
            .map_err(status_error)
            .with_context(|| format!("loading {model_ref}"))?
            .into_inner();
        ensure!(
            loaded.state == pb::LoadedModelState::Ready as i32,
            "{model_ref} did not load: {}",
            loaded
                .error
                .map_or_else(|| format!("state {}", loaded.state), |e| e.message)
        );
        Ok(model_ref)
    }

    /// Stops every service and drops the stack's schemas; problems are logged, not returned
    /// (the figures are already measured).
    pub async fn shutdown(self) {
        if let Err(error) = self.stack.shutdown().await {
            tracing::warn!(%error, "the benchmark stack stopped with an error");
        }
        if let Err(error) = drop_schemas(&self.postgres.database_url, &self.schema_prefix).await {
            tracing::warn!(%error, prefix = %self.schema_prefix, "cannot drop the benchmark schemas");
        }
    }
}

fn service(stack: &Stack, name: &str) -> anyhow::Result<std::net::SocketAddr> {
    stack
        .services
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.grpc)
        .with_context(|| format!("the stack has no {name} service"))
}

async fn drop_schemas(database_url: &str, prefix: &str) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(database_url).await?;
    let schemas: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)")
            .bind(format!("{prefix}_"))
            .fetch_all(&pool)
            .await?;
    for schema in schemas {
        sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .execute(&pool)
            .await?;
    }
    pool.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tiny_checkpoint_loads_back_with_its_tokenizer() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_checkpoint(dir.path(), Shape::Tiny, 0).expect("written");
        let loaded = lmforge_model::hf::load_checkpoint(
            dir.path(),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .expect("loads");
        assert_eq!(loaded.config, ModelConfig::tiny());
        let checked = crate::model_cmd::inspect(dir.path()).expect("importable");
        assert_eq!(checked.architecture, "LlamaForCausalLM");
        assert!(!checked.chat_template.is_empty());
    }

    #[test]
    fn the_tokenizer_covers_the_vocab_and_round_trips_text() {
        let dir = tempfile::tempdir().expect("temp dir");
        write_tokenizer(dir.path(), 4096).expect("written");
        let tokenizer = TextTokenizer::from_dir(dir.path()).expect("loads");
        assert_eq!(tokenizer.vocab_size(), 4096);
        assert_eq!(tokenizer.eos_token_id(), Some(2));
        assert!(tokenizer.chat_template.is_some());
        let text = "the model serves Many requests, 42 at once — ünïcode too";
        let ids = tokenizer.encode(text, false).expect("encodes");
        assert!(
            ids.len() < text.len() * 3 / 4,
            "common pairs merge: {ids:?}"
        );
        let with_bos = tokenizer.encode(text, true).expect("encodes");
        assert_eq!(with_bos[0], 1, "BOS added");
        use lmforge_model::stopping::Detokenize;
        assert_eq!(tokenizer.decode(&ids).expect("decodes"), text);
        // The last ids decode too (every id a model can emit is a token).
        let tail: Vec<u32> = (4000..4096).collect();
        assert!(!tokenizer.decode(&tail).expect("decodes").is_empty());
    }
}
