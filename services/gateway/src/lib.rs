//! The gateway: the public, OpenAI-compatible front (`lmforge.v1.OpenAIService` and
//! `lmforge.v1.GatewayAdminService` over gRPC). API keys live in the Postgres schema
//! `gateway`; generation goes to the inference service.
//!
//! - [`config`]: flags and `LMFORGE_GATEWAY_*` env vars.
//! - [`serve`]: what `main`, `lmforge up` and the tests call.

pub mod config;

use std::future::Future;

use lmforge_proto::v1::gateway_admin_service_server::{self, GatewayAdminServiceServer};
use lmforge_proto::v1::open_ai_service_server::{self, OpenAiServiceServer};
use lmforge_runtime::probes::Probes;
use lmforge_runtime::server::{ServiceHost, grpc_server};
use lmforge_runtime::{Listeners, StartupError};

pub use config::Config;

/// The service name used in telemetry, metrics and messages.
pub const NAME: &str = "gateway";

/// `lmforge.v1.OpenAIService`.
#[derive(Debug, Clone)]
pub struct OpenAiApi {
    #[allow(dead_code)] // used by the RPCs of the gateway issue
    pool: sqlx::PgPool,
}

impl open_ai_service_server::OpenAiService for OpenAiApi {}

/// `lmforge.v1.GatewayAdminService`.
#[derive(Debug, Clone)]
pub struct GatewayAdminApi {
    #[allow(dead_code)] // used by the RPCs of the gateway issue
    pool: sqlx::PgPool,
}

impl gateway_admin_service_server::GatewayAdminService for GatewayAdminApi {}

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
        &[
            open_ai_service_server::SERVICE_NAME,
            gateway_admin_service_server::SERVICE_NAME,
        ],
        Probes::new()
            .with_postgres(pool.clone())
            .with_grpc_health("inference", config.inference_url.clone())
            .every(config.lifecycle.probe_interval),
    )
    .drain_timeout(config.lifecycle.drain_timeout);
    let router = host
        .router(&mut grpc_server(NAME))?
        .add_service(OpenAiServiceServer::new(OpenAiApi { pool: pool.clone() }))
        .add_service(GatewayAdminServiceServer::new(GatewayAdminApi {
            pool: pool.clone(),
        }));
    host.run(router, listeners, shutdown).await
}
