//! Configuration of the trainer service.

use std::net::SocketAddr;

use std::path::PathBuf;

use lmforge_runtime::args::{LifecycleArgs, NatsArgs, parse_endpoint};
use lmforge_runtime::main_entry::ServiceConfig;
use lmforge_runtime::{Listeners, StartupError};
use tonic::transport::Endpoint;

/// Flags and env vars of `lmforge-trainer`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "lmforge-trainer", version, about = "lmforge trainer worker")]
pub struct Config {
    /// gRPC listen address.
    #[arg(
        long,
        env = "LMFORGE_TRAINER_LISTEN",
        default_value = "127.0.0.1:50056"
    )]
    pub listen: SocketAddr,
    /// Admin HTTP listen address (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "LMFORGE_TRAINER_ADMIN_LISTEN",
        default_value = "127.0.0.1:9106"
    )]
    pub admin_listen: SocketAddr,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Address of the registry service.
    #[arg(long, env = "LMFORGE_REGISTRY_URL", default_value = "http://127.0.0.1:50053", value_parser = parse_endpoint)]
    pub registry_url: Endpoint,
    /// Address of the ingest service (dataset versions).
    #[arg(long, env = "LMFORGE_INGEST_URL", default_value = "http://127.0.0.1:50051", value_parser = parse_endpoint)]
    pub ingest_url: Endpoint,
    /// Artifact store for checkpoints (shared with the registry and ingest): a directory or
    /// `file:///abs/dir`, `s3://bucket/prefix`, `gs://…`, `az://…`.
    #[arg(long, env = "LMFORGE_ARTIFACTS", default_value = ".lmforge/artifacts")]
    pub artifacts: String,
    /// Local cache of base models and datasets (by digest) and scratch space of runs.
    #[arg(
        long,
        env = "LMFORGE_TRAINER_CACHE_DIR",
        default_value = ".lmforge/trainer"
    )]
    pub cache_dir: PathBuf,
    /// Device to train on: `cpu`, or `cuda:N` (needs the `cuda` build feature).
    #[arg(long, env = "LMFORGE_TRAINER_DEVICE", default_value = "cpu")]
    pub device: String,
    /// This worker's id in job state and logs; empty → `<hostname>-<pid>`.
    #[arg(long, env = "LMFORGE_TRAINER_WORKER_ID", default_value = "")]
    pub worker_id: String,
    /// Subject prefix of the work queue (must match the jobs service).
    #[arg(
        long,
        env = "LMFORGE_JOBS_SUBJECT_PREFIX",
        default_value = "lmforge.jobs"
    )]
    pub subject_prefix: String,
    /// JetStream work-queue stream name (must match the jobs service).
    #[arg(long, env = "LMFORGE_JOBS_STREAM", default_value = "LMFORGE_JOBS")]
    pub stream: String,
    /// Minimum time between two progress reports (every step is reported when slower).
    #[arg(long, env = "LMFORGE_TRAINER_PROGRESS_INTERVAL", default_value = "200ms", value_parser = lmforge_runtime::args::parse_duration)]
    pub progress_interval: std::time::Duration,
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
        self.nats.validate()?;
        lmforge_store::ArtifactStore::from_url(&self.artifacts_url()?)
            .map(|_| ())
            .map_err(|e| StartupError::Invalid {
                setting: "LMFORGE_ARTIFACTS",
                reason: e.to_string(),
            })?;
        crate::worker::parse_device(&self.device).map_err(|reason| StartupError::Invalid {
            setting: "LMFORGE_TRAINER_DEVICE",
            reason,
        })?;
        Ok(())
    }

    async fn bind(&self) -> Result<Listeners, StartupError> {
        Listeners::bind(
            (self.listen, "LMFORGE_TRAINER_LISTEN"),
            (self.admin_listen, "LMFORGE_TRAINER_ADMIN_LISTEN"),
        )
        .await
    }
}
