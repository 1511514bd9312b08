//! Configuration of the inference service.

use std::net::SocketAddr;
use std::path::PathBuf;

use lmforge_runtime::args::{LifecycleArgs, parse_endpoint};
use lmforge_runtime::main_entry::ServiceConfig;
use lmforge_runtime::{Listeners, StartupError};
use tonic::transport::Endpoint;

/// Weight quantization applied at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum QuantArg {
    /// As stored.
    None,
    /// int8 blocks of 32 (Q8_0) for every linear layer.
    #[value(name = "q8_0")]
    Q8_0,
}

/// Compute dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

/// Flags and env vars of `lmforge-inference`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "lmforge-inference",
    version,
    about = "lmforge inference service"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(
        long,
        env = "LMFORGE_INFERENCE_LISTEN",
        default_value = "127.0.0.1:50054"
    )]
    pub listen: SocketAddr,
    /// Admin HTTP listen address (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "LMFORGE_INFERENCE_ADMIN_LISTEN",
        default_value = "127.0.0.1:9104"
    )]
    pub admin_listen: SocketAddr,
    /// Address of the registry service.
    #[arg(long, env = "LMFORGE_REGISTRY_URL", default_value = "http://127.0.0.1:50053", value_parser = parse_endpoint)]
    pub registry_url: Endpoint,
    /// Models to load at start (`name@alias`, `name/3`), repeatable or comma-separated; the
    /// first is the default model. Alias references follow alias moves.
    #[arg(
        long = "model",
        env = "LMFORGE_INFERENCE_MODELS",
        value_delimiter = ','
    )]
    pub models: Vec<String>,
    /// Quantization of the models loaded at start.
    #[arg(
        long,
        env = "LMFORGE_INFERENCE_QUANTIZATION",
        value_enum,
        default_value = "none"
    )]
    pub quantization: QuantArg,
    /// Compute dtype.
    #[arg(
        long,
        env = "LMFORGE_INFERENCE_DTYPE",
        value_enum,
        default_value = "f32"
    )]
    pub dtype: DtypeArg,
    /// Local cache of downloaded versions (one directory per digest).
    #[arg(
        long,
        env = "LMFORGE_INFERENCE_CACHE_DIR",
        default_value = ".lmforge/models"
    )]
    pub cache_dir: PathBuf,
    /// KV cache per model, in MiB (sets the number of blocks).
    #[arg(long, env = "LMFORGE_INFERENCE_KV_CACHE_MB", default_value_t = 512)]
    pub kv_cache_mb: usize,
    /// Exact number of KV blocks per model (overrides --kv-cache-mb).
    #[arg(long, env = "LMFORGE_INFERENCE_KV_BLOCKS")]
    pub kv_blocks: Option<usize>,
    /// Tokens per KV block.
    #[arg(long, env = "LMFORGE_INFERENCE_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Tokens per engine iteration (prefill chunks plus decode tokens).
    #[arg(
        long,
        env = "LMFORGE_INFERENCE_MAX_BATCH_TOKENS",
        default_value_t = 512
    )]
    pub max_batch_tokens: usize,
    /// Sequences generating at once per model.
    #[arg(long, env = "LMFORGE_INFERENCE_MAX_RUNNING", default_value_t = 64)]
    pub max_running: usize,
    /// Requests allowed to wait per model; more are refused with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "LMFORGE_INFERENCE_MAX_WAITING_REQUESTS",
        default_value_t = 512
    )]
    pub max_waiting_requests: usize,
    /// Prompt tokens allowed to wait per model; more are refused with RESOURCE_EXHAUSTED.
    #[arg(
        long,
        env = "LMFORGE_INFERENCE_MAX_WAITING_TOKENS",
        default_value_t = 262_144
    )]
    pub max_waiting_tokens: usize,
    /// Turn off reuse of cached KV blocks across requests sharing a prefix.
    #[arg(long, env = "LMFORGE_INFERENCE_NO_PREFIX_CACHING")]
    pub no_prefix_caching: bool,
    /// Weights plus KV cache of all loaded models, in MiB.
    #[arg(
        long,
        env = "LMFORGE_INFERENCE_MEMORY_BUDGET_MB",
        default_value_t = 8192
    )]
    pub memory_budget_mb: u64,
    /// `max_tokens` of requests that leave it unset.
    #[arg(
        long,
        env = "LMFORGE_INFERENCE_DEFAULT_MAX_TOKENS",
        default_value_t = 256
    )]
    pub default_max_tokens: u32,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
}

impl ServiceConfig for Config {
    const NAME: &'static str = crate::NAME;
    type Listeners = Listeners;

    fn validate(&self) -> Result<(), StartupError> {
        let bad = |setting: &'static str, reason: &str| {
            Err(StartupError::Invalid {
                setting,
                reason: reason.to_string(),
            })
        };
        if self.block_size == 0 {
            return bad("LMFORGE_INFERENCE_BLOCK_SIZE", "must be >= 1");
        }
        if self.kv_blocks == Some(0) || self.kv_cache_mb == 0 {
            return bad(
                "LMFORGE_INFERENCE_KV_CACHE_MB",
                "the KV cache needs at least one block",
            );
        }
        if self.max_batch_tokens == 0 || self.max_running == 0 {
            return bad("LMFORGE_INFERENCE_MAX_BATCH_TOKENS", "limits must be >= 1");
        }
        if self.default_max_tokens == 0 {
            return bad("LMFORGE_INFERENCE_DEFAULT_MAX_TOKENS", "must be >= 1");
        }
        Ok(())
    }

    async fn bind(&self) -> Result<Listeners, StartupError> {
        Listeners::bind(
            (self.listen, "LMFORGE_INFERENCE_LISTEN"),
            (self.admin_listen, "LMFORGE_INFERENCE_ADMIN_LISTEN"),
        )
        .await
    }
}
