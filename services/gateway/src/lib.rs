//! The gateway: the public, OpenAI-compatible front. HTTP (axum) on `--http-listen`, and the
//! same API over gRPC (`lmforge.v1.OpenAIService`) beside `lmforge.v1.GatewayAdminService`.
//! API keys live in the Postgres schema `gateway`; generation goes to the inference service.
//!
//! - [`config`]: flags and `LMFORGE_GATEWAY_*` env vars.
//! - [`gateway`]: the request pipeline both fronts call; [`types`]: its request and answer.
//! - [`http`] and [`grpc`]: the two fronts; [`error`]: OpenAI error objects and statuses.
//! - [`keys`]: API keys; [`limits`]: rate limits; [`cache`]: response cache and merging.
//! - [`routing`]: the YAML rules, presets and filters; [`filter`]: the compliance filter.
//! - [`upstream`]: calls to inference with fallback; [`stats`]: per-route counters.
//! - [`serve`]: what `main`, `lmforge up` and the tests call.

pub mod cache;
pub mod classifier;
pub mod config;
pub mod error;
pub mod filter;
pub mod gateway;
pub mod grpc;
pub mod http;
pub mod keys;
pub mod limits;
pub mod routing;
pub mod stats;
pub mod types;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use lmforge_proto::v1::gateway_admin_service_server::{self, GatewayAdminServiceServer};
use lmforge_proto::v1::open_ai_service_server::{self, OpenAiServiceServer};
use lmforge_runtime::probes::Probes;
use lmforge_runtime::server::{ServiceHost, grpc_server};
use lmforge_runtime::{Listeners, StartupError};
use tokio::net::TcpListener;

pub use config::Config;
pub use gateway::Gateway;

/// The service name used in telemetry, metrics and messages.
pub const NAME: &str = "gateway";

/// Embedded migrations of the `gateway` schema.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Binds `config.http_listen`, then serves as [`serve_with_http`].
pub async fn serve(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartupError> {
    let http =
        lmforge_runtime::listeners::bind(config.http_listen, "LMFORGE_GATEWAY_HTTP_LISTEN").await?;
    serve_with_http(config, listeners, http, shutdown).await
}

/// Connects to Postgres, migrates, loads the routing file, then serves HTTP on `http` and
/// gRPC on `listeners` until `shutdown` resolves.
pub async fn serve_with_http(
    config: Config,
    listeners: Listeners,
    http: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartupError> {
    let pool = config
        .postgres
        .connect(&config.schema, config.lifecycle.startup_timeout)
        .await?;
    lmforge_runtime::postgres::migrate(&pool, &MIGRATOR, &config.schema).await?;
    let routing = routing::RoutingTable::load(config.routing_file.clone()).map_err(|e| {
        StartupError::Invalid {
            setting: "LMFORGE_GATEWAY_ROUTING_FILE",
            reason: e.to_string(),
        }
    })?;
    let gateway = Arc::new(Gateway {
        keys: keys::KeyStore::new(pool.clone(), config.admin_key.clone()),
        limiter: limits::RateLimiter::default(),
        routing: routing.clone(),
        cache: cache::ResponseCache::new(config.cache_bytes, config.cache_ttl),
        upstream: upstream::Upstream::new(config.inference_url.clone()),
        stats: stats::RouteStats::default(),
        limits: gateway::Limits {
            max_body_bytes: config.max_body_bytes,
            max_messages: config.max_messages,
            max_tokens: config.max_tokens,
        },
    });
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
        .add_service(OpenAiServiceServer::new(grpc::OpenAiApi::new(
            gateway.clone(),
        )))
        .add_service(GatewayAdminServiceServer::new(grpc::GatewayAdminApi::new(
            gateway.clone(),
            grpc::KeyDefaults {
                requests_per_minute: config.default_requests_per_minute,
                tokens_per_minute: config.default_tokens_per_minute,
            },
        )));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let watcher = tokio::spawn(routing.watch(config.routing_poll, stopped(stop_rx.clone())));
    tracing::info!(http = %lmforge_runtime::listeners::local_addr(&http), "serving the OpenAI API");

    let http_stop = stopped(stop_rx.clone());
    let http_server = tokio::spawn(async move {
        axum::serve(
            // Small SSE chunks and JSON replies must not wait on Nagle.
            axum::serve::ListenerExt::tap_io(http, |tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            http::router(gateway.clone()).into_make_service(),
        )
        .with_graceful_shutdown(http_stop)
        .await
    });
    let result = host
        .run(router, listeners, async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
    let _ = http_server.await;
    let _ = watcher.await;
    result
}
