//! Configuration of the gateway service.

use std::net::SocketAddr;

use lmforge_runtime::args::{LifecycleArgs, PostgresArgs, parse_endpoint};
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
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
}

impl ServiceConfig for Config {
    const NAME: &'static str = crate::NAME;
    type Listeners = Listeners;

    fn validate(&self) -> Result<(), StartupError> {
        self.postgres.validate(&self.schema)
    }

    async fn bind(&self) -> Result<Listeners, StartupError> {
        Listeners::bind(
            (self.listen, "LMFORGE_GATEWAY_LISTEN"),
            (self.admin_listen, "LMFORGE_GATEWAY_ADMIN_LISTEN"),
        )
        .await
    }
}
