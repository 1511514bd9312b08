//! The inference service: loads registered model versions and generates with a
//! continuous-batching engine (`lmforge.v1.InferenceService`). It depends on the registry.
//!
//! - [`config`]: flags and `LMFORGE_INFERENCE_*` env vars.
//! - [`serve`]: what `main`, `lmforge up` and the tests call.

pub mod config;

use std::future::Future;

use lmforge_proto::v1::inference_service_server::{self, InferenceServiceServer};
use lmforge_runtime::probes::Probes;
use lmforge_runtime::server::{ServiceHost, grpc_server};
use lmforge_runtime::{Listeners, StartupError};

pub use config::Config;

/// The service name used in telemetry, metrics and messages.
pub const NAME: &str = "inference";

/// `lmforge.v1.InferenceService`.
#[derive(Debug, Clone, Default)]
pub struct InferenceApi {}

impl inference_service_server::InferenceService for InferenceApi {}

/// Connects to nothing yet, then serves until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartupError> {
    let host = ServiceHost::new(
        NAME,
        &[inference_service_server::SERVICE_NAME],
        Probes::new()
            .with_grpc_health("registry", config.registry_url.clone())
            .every(config.lifecycle.probe_interval),
    )
    .drain_timeout(config.lifecycle.drain_timeout);
    let router = host
        .router(&mut grpc_server(NAME))?
        .add_service(InferenceServiceServer::new(InferenceApi::default()));
    host.run(router, listeners, shutdown).await
}
