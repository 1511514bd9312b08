//! The ingest service: turns raw data files into immutable, content-addressed dataset
//! versions (`lmforge.v1.DatasetService`). Its tables live in the Postgres schema `ingest`.
//!
//! - [`config`]: flags and `LMFORGE_INGEST_*` env vars.
//! - [`serve`]: what `main`, `lmforge up` and the tests call.

pub mod config;

use std::future::Future;

use lmforge_proto::v1::dataset_service_server::{self, DatasetServiceServer};
use lmforge_runtime::probes::Probes;
use lmforge_runtime::server::{ServiceHost, grpc_server};
use lmforge_runtime::{Listeners, StartupError};

pub use config::Config;

/// The service name used in telemetry, metrics and messages.
pub const NAME: &str = "ingest";

/// `lmforge.v1.DatasetService` over the service's Postgres schema.
#[derive(Debug, Clone)]
pub struct DatasetApi {
    #[allow(dead_code)] // used by the RPCs of the ingest issue
    pool: sqlx::PgPool,
}

impl dataset_service_server::DatasetService for DatasetApi {}

/// Connects to Postgres, then serves until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartupError> {
    let pool = config
        .postgres
        .connect(&config.schema, config.lifecycle.startup_timeout)
        .await?;
    let host = ServiceHost::new(
        NAME,
        &[dataset_service_server::SERVICE_NAME],
        Probes::new()
            .with_postgres(pool.clone())
            .every(config.lifecycle.probe_interval),
    )
    .drain_timeout(config.lifecycle.drain_timeout);
    let router = host
        .router(&mut grpc_server(NAME))?
        .add_service(DatasetServiceServer::new(DatasetApi { pool }));
    host.run(router, listeners, shutdown).await
}
