//! The jobs service: the training-job lifecycle (`lmforge.v1.JobService`). Postgres schema
//! `jobs` is the source of truth for job state; work is dispatched on a NATS JetStream
//! work-queue stream that trainer workers pull from.
//!
//! - [`config`]: flags and `LMFORGE_JOBS_*` env vars.
//! - [`serve`]: what `main`, `lmforge up` and the tests call.

pub mod api;
pub mod config;
pub mod dispatch;
pub mod queue;
pub mod reports;
pub mod spec;
pub mod store;

use std::future::Future;
use std::sync::Arc;

use lmforge_proto::v1::job_service_server::{self, JobServiceServer};
use lmforge_runtime::probes::Probes;
use lmforge_runtime::server::{ServiceHost, grpc_server};
use lmforge_runtime::{Listeners, StartupError};
use sqlx::postgres::PgListener;

pub use config::Config;

/// The service name used in telemetry, metrics and messages.
pub const NAME: &str = "jobs";

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

fn invalid(setting: &'static str, reason: impl std::fmt::Display) -> StartupError {
    StartupError::Invalid {
        setting,
        reason: reason.to_string(),
    }
}

/// Connects to Postgres and NATS, sets up the work queue, then serves until `shutdown`
/// resolves.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartupError> {
    let pool = config
        .postgres
        .connect(&config.schema, config.lifecycle.startup_timeout)
        .await?;
    lmforge_runtime::postgres::migrate(&pool, &MIGRATOR, &config.schema).await?;
    let nats = config
        .nats
        .connect("lmforge-jobs", config.lifecycle.startup_timeout)
        .await?;
    let js = async_nats::jetstream::new(nats.clone());
    let names = queue::QueueNames::new(&config.subject_prefix, &config.stream);
    queue::ensure(
        &js,
        &names,
        queue::QueueSettings {
            ack_wait: config.ack_wait,
            max_deliver: i64::from(config.max_attempts),
            replicas: usize::from(config.stream_replicas),
        },
    )
    .await
    .map_err(|e| {
        invalid(
            "LMFORGE_NATS_URL",
            format!("cannot set up the work queue: {e}"),
        )
    })?;

    let (events, _) = tokio::sync::broadcast::channel(1024);
    let mut listener = PgListener::connect_with(&pool)
        .await
        .map_err(|e| invalid("LMFORGE_DATABASE_URL", format!("cannot LISTEN: {e}")))?;
    listener
        .listen(&store::channel(&config.schema))
        .await
        .map_err(|e| invalid("LMFORGE_DATABASE_URL", format!("cannot LISTEN: {e}")))?;
    let shared = Arc::new(api::Shared {
        pool: pool.clone(),
        schema: config.schema.clone(),
        dispatcher: dispatch::Dispatcher {
            nats: nats.clone(),
            js,
            names: names.clone(),
        },
        max_attempts: config.max_attempts,
        events: events.clone(),
    });
    let reports = nats
        .queue_subscribe(names.report_wildcard(), "lmforge-jobs".into())
        .await
        .map_err(|e| invalid("LMFORGE_NATS_URL", e))?;
    let advisories = nats
        .queue_subscribe(names.max_deliveries_advisory(), "lmforge-jobs".into())
        .await
        .map_err(|e| invalid("LMFORGE_NATS_URL", e))?;
    let background = [
        tokio::spawn(reports::serve_reports(shared.clone(), reports)),
        tokio::spawn(reports::serve_advisories(shared.clone(), advisories)),
        tokio::spawn(reports::sweep_forever(shared.clone(), config.ack_wait)),
        tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(n) => {
                        if let Ok(id) = uuid::Uuid::parse_str(n.payload()) {
                            let _ = events.send(id);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "job event listener lost its connection, retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                }
            }
        }),
    ];
    let timeout = std::time::Duration::from_secs(5);
    let registry = config
        .registry_url
        .clone()
        .connect_timeout(timeout)
        .connect_lazy();
    let ingest = config
        .ingest_url
        .clone()
        .connect_timeout(timeout)
        .connect_lazy();
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
        .add_service(JobServiceServer::new(api::JobApi::new(
            shared, registry, ingest,
        )));
    let result = host.run(router, listeners, shutdown).await;
    for task in background {
        task.abort();
    }
    result
}
