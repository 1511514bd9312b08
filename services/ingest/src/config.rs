//! Configuration of the ingest service.

use std::net::SocketAddr;

use lmforge_runtime::args::{LifecycleArgs, PostgresArgs};
use lmforge_runtime::main_entry::ServiceConfig;
use lmforge_runtime::{Listeners, StartupError};

/// Flags and env vars of `lmforge-ingest`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "lmforge-ingest",
    version,
    about = "lmforge dataset ingestion service"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "LMFORGE_INGEST_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Admin HTTP listen address (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "LMFORGE_INGEST_ADMIN_LISTEN",
        default_value = "127.0.0.1:9101"
    )]
    pub admin_listen: SocketAddr,
    /// Postgres schema holding the service's tables.
    #[arg(long, env = "LMFORGE_INGEST_SCHEMA", default_value = "ingest")]
    pub schema: String,
    #[command(flatten)]
    pub postgres: PostgresArgs,
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
            (self.listen, "LMFORGE_INGEST_LISTEN"),
            (self.admin_listen, "LMFORGE_INGEST_ADMIN_LISTEN"),
        )
        .await
    }
}
