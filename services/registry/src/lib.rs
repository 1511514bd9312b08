//! The registry service: models, immutable versions, artifacts, lineage, metrics and aliases
//! (`lmforge.v1.RegistryService`), in the Postgres schema `registry`.
//!
//! - [`config`]: flags and `LMFORGE_REGISTRY_*` env vars.
//! - [`api`]: the gRPC handlers; [`catalog`] (models, versions, files) and [`aliases`]
//!   hold the Postgres logic; [`domain`], [`names`], [`convert`], [`error`] their types.
//! - [`serve`]: what `main`, `lmforge up` and the tests call.

pub mod aliases;
pub mod api;
pub mod cache;
pub mod catalog;
pub mod config;
pub mod convert;
pub mod domain;
pub mod error;
pub mod names;
pub mod search;

use std::future::Future;

use lmforge_proto::v1::registry_service_server::{self, RegistryServiceServer};
use lmforge_runtime::probes::Probes;
use lmforge_runtime::server::{ServiceHost, grpc_server};
use lmforge_runtime::{Listeners, StartupError};

pub use config::Config;

/// The service name used in telemetry, metrics and messages.
pub const NAME: &str = "registry";

/// The registry's tables, created and upgraded at start-up.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

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
    lmforge_runtime::postgres::migrate(&pool, &MIGRATOR, &config.schema).await?;
    let store = lmforge_store::ArtifactStore::from_url(&config.artifacts_url()?).map_err(|e| {
        StartupError::Invalid {
            setting: "LMFORGE_ARTIFACTS",
            reason: e.to_string(),
        }
    })?;
    let cache = cache::ResolveCache::default();
    let watcher = aliases::AliasWatcher::start(&pool, &config.schema, cache.clone())
        .await
        .map_err(|e| StartupError::Invalid {
            setting: "LMFORGE_DATABASE_URL",
            reason: format!("cannot LISTEN for alias moves: {e}"),
        })?;
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
        .add_service(RegistryServiceServer::new(api::RegistryApi::new(
            pool.clone(),
            store,
            config.schema.clone(),
            watcher,
            cache,
        )));
    host.run(router, listeners, shutdown).await
}
