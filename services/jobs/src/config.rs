//! Configuration of the jobs service.

use std::net::SocketAddr;

use std::time::Duration;

use lmforge_runtime::args::{
    LifecycleArgs, NatsArgs, PostgresArgs, parse_duration, parse_endpoint,
};
use lmforge_runtime::main_entry::ServiceConfig;
use lmforge_runtime::{Listeners, StartupError};
use tonic::transport::Endpoint;

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
    /// Address of the registry service (base models, results).
    #[arg(long, env = "LMFORGE_REGISTRY_URL", default_value = "http://127.0.0.1:50053", value_parser = parse_endpoint)]
    pub registry_url: Endpoint,
    /// Address of the ingest service (dataset versions).
    #[arg(long, env = "LMFORGE_INGEST_URL", default_value = "http://127.0.0.1:50051", value_parser = parse_endpoint)]
    pub ingest_url: Endpoint,
    /// Subject prefix of the work queue and the worker protocol.
    #[arg(
        long,
        env = "LMFORGE_JOBS_SUBJECT_PREFIX",
        default_value = "lmforge.jobs"
    )]
    pub subject_prefix: String,
    /// JetStream work-queue stream name.
    #[arg(long, env = "LMFORGE_JOBS_STREAM", default_value = "LMFORGE_JOBS")]
    pub stream: String,
    /// A dispatched job whose worker neither acks nor heartbeats for this long is redelivered.
    #[arg(long, env = "LMFORGE_JOBS_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,
    /// Replicas of the work-queue stream when it is created (a clustered NATS: 3 keeps the
    /// queue through the loss of a node; a single server takes only 1).
    #[arg(long, env = "LMFORGE_JOBS_STREAM_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=5))]
    pub stream_replicas: u16,
    /// Deliveries (attempts) per job before it is FAILED with MAX_ATTEMPTS_EXCEEDED.
    #[arg(long, env = "LMFORGE_JOBS_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub max_attempts: u32,
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
        self.nats.validate()?;
        let subject_ok = !self.subject_prefix.is_empty()
            && self.subject_prefix.split('.').all(|t| {
                !t.is_empty()
                    && t.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
            });
        if !subject_ok {
            return Err(StartupError::Invalid {
                setting: "LMFORGE_JOBS_SUBJECT_PREFIX",
                reason: format!("`{}` is not a NATS subject prefix", self.subject_prefix),
            });
        }
        if self.stream.is_empty()
            || !self
                .stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
        {
            return Err(StartupError::Invalid {
                setting: "LMFORGE_JOBS_STREAM",
                reason: format!("`{}` is not a stream name", self.stream),
            });
        }
        if self.ack_wait < Duration::from_millis(100) {
            return Err(StartupError::Invalid {
                setting: "LMFORGE_JOBS_ACK_WAIT",
                reason: "must be at least 100ms".into(),
            });
        }
        Ok(())
    }

    async fn bind(&self) -> Result<Listeners, StartupError> {
        Listeners::bind(
            (self.listen, "LMFORGE_JOBS_LISTEN"),
            (self.admin_listen, "LMFORGE_JOBS_ADMIN_LISTEN"),
        )
        .await
    }
}
