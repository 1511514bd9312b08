//! Configuration of the jobs service.

use std::net::SocketAddr;

use lmforge_runtime::args::{LifecycleArgs, NatsArgs, PostgresArgs};
use lmforge_runtime::main_entry::ServiceConfig;
use lmforge_runtime::{Listeners, StartupError};

/// Flags and env vars of `lmforge-jobs`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "lmforge-jobs", version, about = "lmforge training-job service")]
pub struct Config {
    /// gRPC listen address.
    #[arg(long, env = "LMFORGE_JOBS_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,
    /// Admin HTTP listen address (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "LMFORGE_JOBS_ADMIN_LISTEN",
        default_value = "127.0.0.1:9102"
    )]
    pub admin_listen: SocketAddr,
    /// Postgres schema holding the service's tables.
    #[arg(long, env = "LMFORGE_JOBS_SCHEMA", default_value = "jobs")]
    pub schema: String,
    #[command(flatten)]
    pub postgres: PostgresArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
}

impl ServiceConfig for Config {
    const NAME: &'static str = crate::NAME;
    type Listeners = Listeners;

    fn validate(&self) -> Result<(), StartupError> {
        self.postgres.validate(&self.schema)?;
        self.nats.validate()
    }

    async fn bind(&self) -> Result<Listeners, StartupError> {
        Listeners::bind(
            (self.listen, "LMFORGE_JOBS_LISTEN"),
            (self.admin_listen, "LMFORGE_JOBS_ADMIN_LISTEN"),
        )
        .await
    }
}
