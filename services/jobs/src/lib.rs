//! The jobs service: the training-job lifecycle (`lmforge.v1.JobService`). Postgres schema
//! `jobs` is the source of truth for job state; work is dispatched on a NATS JetStream
//! work-queue stream that trainer workers pull from.
//!
//! - [`config`]: flags and `LMFORGE_JOBS_*` env vars.
//! - [`serve`]: what `main`, `lmforge up` and the tests call.

pub mod config;

use std::future::Future;

use lmforge_proto::v1::job_service_server::{self, JobServiceServer};
use lmforge_runtime::probes::Probes;
use lmforge_runtime::server::{ServiceHost, grpc_server};
use lmforge_runtime::{Listeners, StartupError};

pub use config::Config;

/// The service name used in telemetry, metrics and messages.
pub const NAME: &str = "jobs";

/// `lmforge.v1.JobService`.
#[derive(Debug, Clone)]
pub struct JobApi {
    #[allow(dead_code)] // used by the RPCs of the jobs issue
    pool: sqlx::PgPool,
    #[allow(dead_code)] // used by the RPCs of the jobs issue
    nats: async_nats::Client,
}

impl job_service_server::JobService for JobApi {}

/// Connects to Postgres and NATS, then serves until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartupError> {
    let pool = config
        .postgres
        .connect(&config.schema, config.lifecycle.startup_timeout)
        .await?;
    let nats = config
        .nats
        .connect("lmforge-jobs", config.lifecycle.startup_timeout)
        .await?;
    let host = ServiceHost::new(
        NAME,
        &[job_service_server::SERVICE_NAME],
        Probes::new()
            .with_postgres(pool.clone())
            .with_nats(nats.clone())
            .every(config.lifecycle.probe_interval),
    )
    .drain_timeout(config.lifecycle.drain_timeout);
    let router = host
        .router(&mut grpc_server(NAME))?
        .add_service(JobServiceServer::new(JobApi {
            pool: pool.clone(),
            nats: nats.clone(),
        }));
    host.run(router, listeners, shutdown).await
}
