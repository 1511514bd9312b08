//! Configuration of the gateway service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lmforge_runtime::args::{LifecycleArgs, PostgresArgs, parse_duration, parse_endpoint};
use lmforge_runtime::main_entry::ServiceConfig;
use lmforge_runtime::{Listeners, StartupError};
use tonic::transport::Endpoint;

/// Flags and env vars of `lmforge-gateway`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "lmforge-gateway", version, about = "lmforge gateway")]
pub struct Config {
    /// gRPC listen address.
    #[arg(
        long,
        env = "LMFORGE_GATEWAY_LISTEN",
        default_value = "127.0.0.1:50055"
    )]
    pub listen: SocketAddr,
    /// Admin HTTP listen address (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "LMFORGE_GATEWAY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9105"
    )]
    pub admin_listen: SocketAddr,
    /// Postgres schema holding the service's tables.
    #[arg(long, env = "LMFORGE_GATEWAY_SCHEMA", default_value = "gateway")]
    pub schema: String,
    #[command(flatten)]
    pub postgres: PostgresArgs,
    /// Address of the inference service.
    #[arg(long, env = "LMFORGE_INFERENCE_URL", default_value = "http://127.0.0.1:50054", value_parser = parse_endpoint)]
    pub inference_url: Endpoint,
    /// OpenAI-compatible HTTP listen address (`/v1/chat/completions`, …).
    #[arg(
        long,
        env = "LMFORGE_GATEWAY_HTTP_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub http_listen: SocketAddr,
    /// YAML file with routing rules, presets and compliance filters; reloaded on change.
    /// Unset → no rules: requests name loaded model references directly.
    #[arg(long, env = "LMFORGE_GATEWAY_ROUTING_FILE")]
    pub routing_file: Option<PathBuf>,
    /// How often the routing file is checked for changes.
    #[arg(long, env = "LMFORGE_GATEWAY_ROUTING_POLL", default_value = "1s", value_parser = parse_duration)]
    pub routing_poll: Duration,
    /// Bootstrap admin API key (for `lmforge key create` before any key exists).
    #[arg(long, env = "LMFORGE_GATEWAY_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Response cache size (bytes of cached answers).
    #[arg(long, env = "LMFORGE_GATEWAY_CACHE_BYTES", default_value_t = 256 << 20)]
    pub cache_bytes: u64,
    /// How long a cached answer is served.
    #[arg(long, env = "LMFORGE_GATEWAY_CACHE_TTL", default_value = "10m", value_parser = parse_duration)]
    pub cache_ttl: Duration,
    /// Largest request body accepted (bytes).
    #[arg(long, env = "LMFORGE_GATEWAY_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Most messages in one chat request.
    #[arg(long, env = "LMFORGE_GATEWAY_MAX_MESSAGES", default_value_t = 256)]
    pub max_messages: usize,
    /// Largest `max_tokens` accepted.
    #[arg(long, env = "LMFORGE_GATEWAY_MAX_TOKENS", default_value_t = 4096)]
    pub max_tokens: u32,
    /// Requests per minute of keys created without limits (0 → unlimited).
    #[arg(long, env = "LMFORGE_GATEWAY_DEFAULT_RPM", default_value_t = 0)]
    pub default_requests_per_minute: u32,
    /// Tokens per minute of keys created without limits (0 → unlimited).
    #[arg(long, env = "LMFORGE_GATEWAY_DEFAULT_TPM", default_value_t = 0)]
    pub default_tokens_per_minute: u32,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
}

impl ServiceConfig for Config {
    const NAME: &'static str = crate::NAME;
    type Listeners = Listeners;

    fn validate(&self) -> Result<(), StartupError> {
        self.postgres.validate(&self.schema)?;
        if let Some(path) = &self.routing_file
            && let Err(error) = crate::routing::RoutingTable::load(Some(path.clone()))
        {
            return Err(StartupError::Invalid {
                setting: "LMFORGE_GATEWAY_ROUTING_FILE",
                reason: error.to_string(),
            });
        }
        Ok(())
    }

    async fn bind(&self) -> Result<Listeners, StartupError> {
        Listeners::bind(
            (self.listen, "LMFORGE_GATEWAY_LISTEN"),
            (self.admin_listen, "LMFORGE_GATEWAY_ADMIN_LISTEN"),
        )
        .await
    }
}
