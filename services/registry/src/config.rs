//! Configuration of the registry service.

use std::net::SocketAddr;

use lmforge_runtime::args::{LifecycleArgs, PostgresArgs};
use lmforge_runtime::main_entry::ServiceConfig;
use lmforge_runtime::{Listeners, StartupError};

/// Flags and env vars of `lmforge-registry`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "lmforge-registry",
    version,
    about = "lmforge model registry service"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(
        long,
        env = "LMFORGE_REGISTRY_LISTEN",
        default_value = "127.0.0.1:50053"
    )]
    pub listen: SocketAddr,
    /// Admin HTTP listen address (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "LMFORGE_REGISTRY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9103"
    )]
    pub admin_listen: SocketAddr,
    /// Postgres schema holding the service's tables.
    #[arg(long, env = "LMFORGE_REGISTRY_SCHEMA", default_value = "registry")]
    pub schema: String,
    /// Where artifacts are stored: a directory or `file:///abs/dir`, `s3://bucket/prefix`,
    /// `gs://…`, `az://…` (cloud credentials from the standard env vars).
    #[arg(long, env = "LMFORGE_ARTIFACTS", default_value = ".lmforge/artifacts")]
    pub artifacts: String,
    #[command(flatten)]
    pub postgres: PostgresArgs,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
}

impl Config {
    /// The artifact store URL, with a plain or relative directory made an absolute
    /// `file://` URL.
    pub fn artifacts_url(&self) -> Result<String, StartupError> {
        lmforge_runtime::args::artifacts_url(&self.artifacts)
    }
}

impl ServiceConfig for Config {
    const NAME: &'static str = crate::NAME;
    type Listeners = Listeners;

    fn validate(&self) -> Result<(), StartupError> {
        self.postgres.validate(&self.schema)?;
        lmforge_store::ArtifactStore::from_url(&self.artifacts_url()?)
            .map(|_| ())
            .map_err(|e| StartupError::Invalid {
                setting: "LMFORGE_ARTIFACTS",
                reason: e.to_string(),
            })
    }

    async fn bind(&self) -> Result<Listeners, StartupError> {
        Listeners::bind(
            (self.listen, "LMFORGE_REGISTRY_LISTEN"),
            (self.admin_listen, "LMFORGE_REGISTRY_ADMIN_LISTEN"),
        )
        .await
    }
}
