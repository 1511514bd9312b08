//! The trainer worker: pulls training jobs from the JetStream work queue, fine-tunes with
//! candle, checkpoints, resumes after a crash and registers the result. It serves no API of
//! its own over gRPC, only health and reflection, plus the admin port.
//!
//! - [`config`]: flags and `LMFORGE_TRAINER_*` env vars.
//! - [`serve`]: what `main`, `lmforge up` and the tests call.

pub mod config;

use std::future::Future;

use lmforge_runtime::probes::Probes;
use lmforge_runtime::server::{ServiceHost, grpc_server};
use lmforge_runtime::{Listeners, StartupError};

pub use config::Config;

/// The service name used in telemetry, metrics and messages.
pub const NAME: &str = "trainer";

/// Connects to NATS, then serves until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartupError> {
    let nats = config
        .nats
        .connect("lmforge-trainer", config.lifecycle.startup_timeout)
        .await?;
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
    host.run(router, listeners, shutdown).await
}
