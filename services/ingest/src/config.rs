//! Configuration of the ingest service.

use std::net::SocketAddr;
use std::path::PathBuf;

use lmforge_runtime::args::{LifecycleArgs, PostgresArgs, parse_endpoint};
use lmforge_runtime::main_entry::ServiceConfig;
use lmforge_runtime::{Listeners, StartupError};
use tonic::transport::Endpoint;

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
    /// Where raw uploads and version shards are stored: a directory or `file:///abs/dir`,
    /// `s3://bucket/prefix`, `gs://…`, `az://…` (shared with the registry by default).
    #[arg(long, env = "LMFORGE_ARTIFACTS", default_value = ".lmforge/artifacts")]
    pub artifacts: String,
    /// Local directory for the pipeline's temporary files (raw copy, shards before upload);
    /// empty → the system temporary directory.
    #[arg(long, env = "LMFORGE_INGEST_WORK_DIR", default_value = "")]
    pub work_dir: String,
    /// Address of the registry service (tokenizers of named models).
    #[arg(long, env = "LMFORGE_REGISTRY_URL", default_value = "http://127.0.0.1:50053", value_parser = parse_endpoint)]
    pub registry_url: Endpoint,
    /// Address of the inference service (paraphrase / back-translation augmentation).
    #[arg(long, env = "LMFORGE_INFERENCE_URL", default_value = "http://127.0.0.1:50054", value_parser = parse_endpoint)]
    pub inference_url: Endpoint,
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

    /// The temporary-file directory.
    pub fn work_dir(&self) -> PathBuf {
        if self.work_dir.trim().is_empty() {
            std::env::temp_dir().join("lmforge-ingest")
        } else {
            PathBuf::from(self.work_dir.trim())
        }
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
            (self.listen, "LMFORGE_INGEST_LISTEN"),
            (self.admin_listen, "LMFORGE_INGEST_ADMIN_LISTEN"),
        )
        .await
    }
}
