//! The inference service: loads registered model versions and generates with a
//! continuous-batching engine (`lmforge.v1.InferenceService`). It depends on the registry.
//!
//! - [`config`]: flags and `LMFORGE_INFERENCE_*` env vars.
//! - [`engine`]: the batching engine thread (scheduler, paged KV blocks, prefix cache).
//! - [`models`]: loaded versions, memory budget, alias hot swaps; [`fetch`] (re-exported from `lmforge-registry-client`): downloads.
//! - [`api`]: the gRPC service.
//! - [`serve`]: what `main`, `lmforge up` and the tests call.

pub mod api;
pub mod config;
pub mod engine;
pub use lmforge_registry_client::fetch;
pub mod models;

use std::future::Future;

use candle_core::DType;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::inference_service_server::{self, InferenceServiceServer};
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use lmforge_runtime::probes::Probes;
use lmforge_runtime::server::{ServiceHost, grpc_server};
use lmforge_runtime::{Listeners, StartupError};

pub use api::InferenceApi;
pub use config::Config;

use crate::config::{DtypeArg, QuantArg};
use crate::engine::EngineConfig;
use crate::models::{LoadSettings, ModelManager};

/// The service name used in telemetry, metrics and messages.
pub const NAME: &str = "inference";

/// The model manager's settings from the service configuration.
pub fn load_settings(config: &Config) -> LoadSettings {
    LoadSettings {
        cache_dir: config.cache_dir.clone(),
        engine: EngineConfig {
            block_size: config.block_size,
            num_blocks: config.kv_blocks.unwrap_or(1),
            max_batch_tokens: config.max_batch_tokens,
            max_running: config.max_running,
            max_waiting_requests: config.max_waiting_requests,
            max_waiting_tokens: config.max_waiting_tokens,
            prefix_caching: !config.no_prefix_caching,
        },
        kv_cache_bytes: config.kv_cache_mb << 20,
        fixed_kv_blocks: config.kv_blocks.is_some(),
        memory_budget_bytes: config.memory_budget_mb << 20,
        dtype: match config.dtype {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        },
    }
}

/// Loads the configured models in the background and serves until `shutdown` resolves.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartupError> {
    engine::describe_metrics();
    let registry = RegistryServiceClient::new(
        config
            .registry_url
            .clone()
            .connect_timeout(std::time::Duration::from_secs(5))
            .connect_lazy(),
    );
    let models = ModelManager::new(registry, load_settings(&config));
    let quantization = match config.quantization {
        QuantArg::None => pb::Quantization::Unspecified,
        QuantArg::Q8_0 => pb::Quantization::Q80,
    };
    for (i, model_ref) in config.models.iter().enumerate() {
        let models = models.clone();
        let request = pb::LoadModelRequest {
            model_ref: model_ref.clone(),
            quantization: quantization as i32,
            set_default: i == 0,
            ..Default::default()
        };
        tokio::spawn(async move {
            // Failures are logged and shown by ListModels as FAILED.
            let _ = models.load(request).await;
        });
    }
    let host = ServiceHost::new(
        NAME,
        &[inference_service_server::SERVICE_NAME],
        Probes::new()
            .with_grpc_health("registry", config.registry_url.clone())
            .every(config.lifecycle.probe_interval),
    )
    .drain_timeout(config.lifecycle.drain_timeout);
    let api = InferenceApi::new(
        models.clone(),
        api::ApiLimits {
            default_max_tokens: config.default_max_tokens,
        },
    );
    let router = host
        .router(&mut grpc_server(NAME))?
        .add_service(InferenceServiceServer::new(api));
    let result = host.run(router, listeners, shutdown).await;
    models.shutdown();
    result
}
