//! The registry service: models, immutable versions, artifacts, lineage, metrics and aliases
//! (`lmforge.v1.RegistryService`), in the Postgres schema `registry`.
//!
//! - [`config`]: flags and `LMFORGE_REGISTRY_*` env vars.
//! - [`serve`]: what `main`, `lmforge up` and the tests call.

pub mod config;

use std::future::Future;

use lmforge_proto::v1::registry_service_server::{self, RegistryServiceServer};
use lmforge_runtime::probes::Probes;
use lmforge_runtime::server::{ServiceHost, grpc_server};
use lmforge_runtime::{Listeners, StartupError};

pub use config::Config;

/// The service name used in telemetry, metrics and messages.
pub const NAME: &str = "registry";

/// `lmforge.v1.RegistryService`.
#[derive(Debug, Clone)]
pub struct RegistryApi {
    #[allow(dead_code)] // used by the RPCs of the registry issue
    pool: sqlx::PgPool,
}

impl registry_service_server::RegistryService for RegistryApi {}

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
        &[registry_service_server::SERVICE_NAME],
        Probes::new()
            .with_postgres(pool.clone())
            .every(config.lifecycle.probe_interval),
    )
    .drain_timeout(config.lifecycle.drain_timeout);
    let router = host
        .router(&mut grpc_server(NAME))?
        .add_service(RegistryServiceServer::new(RegistryApi {
            pool: pool.clone(),
        }));
    host.run(router, listeners, shutdown).await
}
