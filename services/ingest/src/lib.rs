//! The ingest service: turns raw data files into immutable, content-addressed dataset
//! versions (`lmforge.v1.DatasetService`). Its tables live in the Postgres schema `ingest`;
//! version shards (zstd JSONL) and raw uploads live in the artifact store.
//!
//! - [`config`]: flags and `LMFORGE_INGEST_*` env vars.
//! - Domain, no gRPC: [`record`] (the canonical record), [`parse`] (formats), [`text`],
//!   [`pii`], [`repetition`], [`clean`] (cleaning rules), [`minhash`] and [`dedup`],
//!   [`augment`], [`report`], [`rules`], and [`pipeline`] which runs them all.
//! - [`catalog`]: datasets and versions in Postgres; [`api`]: the gRPC handlers, with
//!   [`settings`] converting requests to pipeline settings and [`peers`] calling the
//!   registry (tokenizers) and inference (rewrites); [`error`]: the one Status mapping.
//! - [`serve`]: what `main`, `lmforge up` and the tests call.

pub mod api;
pub mod augment;
pub mod catalog;
pub mod clean;
pub mod config;
pub mod dedup;
pub mod error;
pub mod minhash;
pub mod parse;
pub mod peers;
pub mod pii;
pub mod pipeline;
pub mod record;
pub mod repetition;
pub mod report;
pub mod rules;
pub mod settings;
pub mod text;

use std::future::Future;

use lmforge_proto::v1::dataset_service_server::{self, DatasetServiceServer};
use lmforge_runtime::probes::Probes;
use lmforge_runtime::server::{ServiceHost, grpc_server};
use lmforge_runtime::{Listeners, StartupError};

pub use config::Config;

/// The service name used in telemetry, metrics and messages.
pub const NAME: &str = "ingest";

/// The ingest tables, created and upgraded at start-up.
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
    let work_dir = config.work_dir();
    std::fs::create_dir_all(&work_dir).map_err(|e| StartupError::Invalid {
        setting: "LMFORGE_INGEST_WORK_DIR",
        reason: format!("cannot create `{}`: {e}", work_dir.display()),
    })?;
    let peers = peers::Peers::new(config.registry_url.clone(), config.inference_url.clone());
    let host = ServiceHost::new(
        NAME,
        &[dataset_service_server::SERVICE_NAME],
        Probes::new()
            .with_postgres(pool.clone())
            .every(config.lifecycle.probe_interval),
    )
    .drain_timeout(config.lifecycle.drain_timeout);
    let api = api::DatasetApi::new(pool, store, peers, work_dir);
    let router = host.router(&mut grpc_server(NAME))?.add_service(
        DatasetServiceServer::new(api)
            .max_decoding_message_size(8 << 20)
            .max_encoding_message_size(8 << 20),
    );
    host.run(router, listeners, shutdown).await
}
