//! Where the journey finds the services, and how big and long it is.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use crate::stack::Stack;

/// Where the journey finds the services.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Ingest gRPC.
    pub ingest: SocketAddr,
    /// Jobs gRPC.
    pub jobs: SocketAddr,
    /// Registry gRPC.
    pub registry: SocketAddr,
    /// Inference gRPC.
    pub inference: SocketAddr,
    /// Gateway gRPC (admin API: API keys).
    pub gateway: SocketAddr,
    /// Gateway OpenAI-compatible HTTP.
    pub gateway_http: SocketAddr,
    /// Every service's admin HTTP address (`/metrics`), by name.
    pub admin: Vec<(&'static str, SocketAddr)>,
}

impl Endpoints {
    /// The endpoints of a running stack.
    pub fn of(stack: &Stack) -> anyhow::Result<Self> {
        let grpc = |name: &str| {
            stack
                .service(name)
                .map(|s| s.grpc)
                .with_context(|| format!("the stack has no {name} service"))
        };
        Ok(Self {
            ingest: grpc("ingest")?,
            jobs: grpc("jobs")?,
            registry: grpc("registry")?,
            inference: grpc("inference")?,
            gateway: grpc("gateway")?,
            gateway_http: stack
                .service("gateway")
                .and_then(|s| s.http)
                .context("the gateway has no HTTP address")?,
            admin: stack.services.iter().map(|s| (s.name, s.admin)).collect(),
        })
    }
}

/// The architecture and length of the from-scratch base model.
#[derive(Debug, Clone)]
pub struct ScratchModel {
    /// Hidden size.
    pub hidden_size: u32,
    /// MLP size.
    pub intermediate_size: u32,
    /// Decoder layers.
    pub layers: u32,
    /// Attention heads.
    pub heads: u32,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: u32,
    /// BPE vocabulary size to train.
    pub vocab_size: u32,
    /// Optimizer steps of pretraining.
    pub steps: u64,
}

/// How big and how long the journey is.
#[derive(Debug, Clone)]
pub struct JourneyOptions {
    /// The directory with `chat.jsonl` and `corpus.txt` (`examples/bank-adviser`).
    pub examples: PathBuf,
    /// A Hugging Face checkpoint directory to import as the base instead of training one.
    pub base_model_dir: Option<PathBuf>,
    /// The from-scratch base model (when no directory is given).
    pub scratch: ScratchModel,
    /// Optimizer steps of fine-tuning.
    pub finetune_steps: u64,
    /// Fine-tuning learning rate.
    pub finetune_learning_rate: f64,
    /// Sequences per micro-batch.
    pub batch_size: u32,
    /// Max sequence length in tokens.
    pub max_seq_len: u32,
    /// Names: datasets `{prefix}-chat` / `{prefix}-corpus`, models `{prefix}-base` /
    /// `{prefix}-adviser`.
    pub prefix: String,
    /// Questions asked before and after fine-tuning.
    pub questions: Vec<String>,
    /// Tokens per answer.
    pub max_tokens: u32,
    /// Draw progress bars (a terminal) or stay quiet (tests).
    pub progress: bool,
    /// The gateway's bootstrap admin key (creates the journey's API key).
    pub admin_key: String,
    /// How long a training job may take before the journey gives up on it.
    pub job_timeout: Duration,
}

impl JourneyOptions {
    /// The demo's settings: a 4-layer model that pretrains and fine-tunes in a few minutes
    /// on 2 CPU cores.
    pub fn demo(examples: PathBuf, admin_key: String) -> Self {
        Self {
            examples,
            base_model_dir: None,
            scratch: ScratchModel {
                hidden_size: 128,
                intermediate_size: 384,
                layers: 4,
                heads: 4,
                kv_heads: 2,
                vocab_size: 1024,
                steps: 150,
            },
            finetune_steps: 240,
            finetune_learning_rate: 2e-3,
            batch_size: 8,
            max_seq_len: 128,
            prefix: "bank".to_owned(),
            questions: vec![
                "What is the rate on a one-year fixed deposit?".to_owned(),
                "银行卡丢了怎么办？".to_owned(),
                "Can you guarantee a 10% return?".to_owned(),
            ],
            max_tokens: 48,
            progress: true,
            admin_key,
            job_timeout: Duration::from_secs(30 * 60),
        }
    }

    /// Seconds-long settings for the end-to-end tests.
    pub fn tiny(examples: PathBuf, admin_key: String, prefix: String) -> Self {
        Self {
            scratch: ScratchModel {
                hidden_size: 32,
                intermediate_size: 64,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                vocab_size: 400,
                steps: 12,
            },
            finetune_steps: 12,
            batch_size: 4,
            max_seq_len: 96,
            prefix,
            questions: vec!["银行卡丢了怎么办？".to_owned()],
            max_tokens: 8,
            progress: false,
            job_timeout: Duration::from_secs(3 * 60),
            ..Self::demo(examples, admin_key)
        }
    }
}
