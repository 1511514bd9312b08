//! The trainer worker: pulls training jobs from the JetStream work queue, fine-tunes with
//! candle, checkpoints, resumes after a crash and registers the result. It serves no API of
//! its own over gRPC, only health and reflection, plus the admin port.
//!
//! - [`config`]: flags and `LMFORGE_TRAINER_*` env vars.
//! - [`serve`]: what `main`, `lmforge up` and the tests call.

pub mod checkpoints;
pub mod config;
pub mod inputs;
pub mod register;
pub mod run;
pub mod worker;

use std::future::Future;
use std::sync::Arc;

use lmforge_jobs::queue::QueueNames;
use lmforge_proto::v1::dataset_service_client::DatasetServiceClient;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use lmforge_runtime::probes::Probes;
use lmforge_runtime::server::{ServiceHost, grpc_server};
use lmforge_runtime::{Listeners, StartupError};
use lmforge_telemetry::propagation::traced_channel;

pub use config::Config;

/// The service name used in telemetry, metrics and messages.
pub const NAME: &str = "trainer";

/// Connects to NATS, then takes jobs until `shutdown` resolves; a job in progress is given
/// back to the queue (it resumes from its latest checkpoint elsewhere).
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartupError> {
    let invalid = |setting: &'static str, reason: String| StartupError::Invalid { setting, reason };
    let device =
        worker::open_device(&config.device).map_err(|r| invalid("LMFORGE_TRAINER_DEVICE", r))?;
    let store = lmforge_store::ArtifactStore::from_url(&config.artifacts_url()?)
        .map_err(|e| invalid("LMFORGE_ARTIFACTS", e.to_string()))?;
    let nats = config
        .nats
        .connect("lmforge-trainer", config.lifecycle.startup_timeout)
        .await?;
    let timeout = std::time::Duration::from_secs(5);
    let worker_id = if config.worker_id.is_empty() {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "trainer".into());
        format!("{host}-{}", std::process::id())
    } else {
        config.worker_id.clone()
    };
    let worker = Arc::new(worker::Worker {
        nats: nats.clone(),
        js: async_nats::jetstream::new(nats.clone()),
        names: QueueNames::new(&config.subject_prefix, &config.stream),
        registry: RegistryServiceClient::new(traced_channel(
            config
                .registry_url
                .clone()
                .connect_timeout(timeout)
                .connect_lazy(),
        )),
        datasets: DatasetServiceClient::new(traced_channel(
            config
                .ingest_url
                .clone()
                .connect_timeout(timeout)
                .connect_lazy(),
        )),
        store,
        cache_dir: config.cache_dir.clone(),
        worker_id,
        device_name: config.device.clone(),
        device,
        progress_interval: config.progress_interval,
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let loop_task = tokio::spawn(worker.run(stop_rx));
    let host = ServiceHost::new(
        NAME,
        &[],
        Probes::new()
            .with_nats(nats.clone())
            .with_grpc_health("registry", config.registry_url.clone())
            .every(config.lifecycle.probe_interval),
    )
    .drain_timeout(config.lifecycle.drain_timeout);
    let router = host.router(&mut grpc_server(NAME))?;
    let result = host
        .run(router, listeners, async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
    // Let the job in progress stop at its next step and be given back.
    let _ = tokio::time::timeout(config.lifecycle.drain_timeout, loop_task).await;
    result
}
