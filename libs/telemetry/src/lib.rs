//! Observability shared by every lmforge service.
//!
//! - [`init`] installs the `tracing` subscriber (text or JSON logs, an env filter), the
//!   OpenTelemetry layer (spans exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is
//!   set) and the W3C trace-context propagator; it returns a [`TelemetryGuard`] whose
//!   shutdown flushes spans.
//! - [`propagation`]: trace context into and out of gRPC metadata ([`propagation::server_span`]
//!   for tonic's `trace_fn`, [`propagation::TraceContextLayer`] for clients) and NATS headers.
//! - [`metrics`]: the Prometheus recorder and the per-RPC request count and latency layer.
//! - [`http`]: the axum middleware giving each HTTP request a server span (parented to its
//!   `traceparent`) and request count and latency metrics.
//! - `testing` (feature `testing`): an in-process OTLP collector for tests.
//! - [`admin`]: the admin HTTP port (`/metrics`, `/healthz`, `/readyz`) and [`admin::Readiness`].

pub mod admin;
pub mod http;
pub mod metrics;
mod otlp;
pub mod propagation;
#[cfg(feature = "testing")]
pub mod testing;

use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Default filter when neither `LMFORGE_LOG` nor `RUST_LOG` is set: our own crates at `info`,
/// chatty transport crates at `warn`.
const DEFAULT_FILTER: &str = "info,h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn,sqlx=warn,async_nats=warn,opentelemetry_sdk=warn,opentelemetry_otlp=warn";

/// Errors while setting telemetry up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `LMFORGE_LOG_FORMAT` is neither `text` nor `json`.
    #[error("LMFORGE_LOG_FORMAT must be `text` or `json`, got `{0}`")]
    BadLogFormat(String),
    /// The log filter does not parse.
    #[error("LMFORGE_LOG / RUST_LOG is not a valid filter: {0}")]
    BadFilter(String),
    /// The OTLP exporter could not be built (bad endpoint URL, …).
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT: {0}")]
    Exporter(String),
    /// A global subscriber is already installed in this process.
    #[error("telemetry is already initialised in this process")]
    AlreadyInitialised,
}

/// How logs are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (the default).
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Everything [`init_with`] needs; [`TelemetryConfig::from_env`] reads it from the environment.
#[derive(Debug, Clone)]
pub struct TelemetryConfig {
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Log line format (`LMFORGE_LOG_FORMAT`).
    pub log_format: LogFormat,
    /// `tracing` env filter of the log lines (`LMFORGE_LOG`, else `RUST_LOG`, else a quiet
    /// default). Span export has its own filter (`LMFORGE_TRACE_FILTER`, default: every
    /// `info` span of lmforge), so quieter logs never cut a trace short.
    pub filter: String,
    /// `tracing` env filter of the spans exported (`LMFORGE_TRACE_FILTER`).
    pub span_filter: String,
    /// OTLP/gRPC collector endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`); no export when unset.
    pub otlp_endpoint: Option<String>,
    /// How long the batch span processor waits before exporting a batch.
    pub export_delay: Duration,
}

impl TelemetryConfig {
    /// Reads `LMFORGE_LOG_FORMAT`, `LMFORGE_LOG`/`RUST_LOG` and `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn from_env(service_name: &str) -> Result<Self, TelemetryError> {
        let log_format = match std::env::var("LMFORGE_LOG_FORMAT").ok().as_deref() {
            None | Some("") | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(TelemetryError::BadLogFormat(other.to_owned())),
        };
        let filter = std::env::var("LMFORGE_LOG")
            .or_else(|_| std::env::var("RUST_LOG"))
            .unwrap_or_else(|_| DEFAULT_FILTER.to_owned());
        let span_filter = std::env::var("LMFORGE_TRACE_FILTER")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_FILTER.to_owned());
        let otlp_endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
            .ok()
            .filter(|s| !s.trim().is_empty());
        Ok(Self {
            service_name: service_name.to_owned(),
            log_format,
            filter,
            span_filter,
            otlp_endpoint,
            export_delay: Duration::from_secs(2),
        })
    }
}

/// Keeps the tracer provider (and the OTLP export runtime) alive; [`TelemetryGuard::shutdown`]
/// flushes what is buffered. Dropping it also shuts down, best effort.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
    export: Option<otlp::ExportRuntime>,
}

impl TelemetryGuard {
    /// Exports every finished span now. Blocks: call it from a plain thread or
    /// `spawn_blocking`, never from a current-thread runtime that also runs the collector.
    pub fn flush(&self) {
        if let Err(error) = self.provider.force_flush() {
            tracing::warn!(%error, "flushing spans failed");
        }
    }

    /// Flushes and stops span export. Blocking, like [`TelemetryGuard::flush`].
    pub fn shutdown(mut self) {
        self.shutdown_inner();
    }

    fn shutdown_inner(&mut self) {
        if let Some(export) = self.export.take() {
            if let Err(error) = self.provider.shutdown() {
                // Logged to stderr directly: the subscriber may be half torn down.
                eprintln!("warning: span export shutdown: {error}");
            }
            export.shutdown();
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.shutdown_inner();
    }
}

static INITIALISED: OnceLock<()> = OnceLock::new();

/// Sets up logs, spans and propagation for `service_name` from the environment.
pub fn init(service_name: &str) -> Result<TelemetryGuard, TelemetryError> {
    init_with(TelemetryConfig::from_env(service_name)?)
}

/// Sets up logs, spans and propagation from an explicit config. Once per process.
pub fn init_with(config: TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    if INITIALISED.set(()).is_err() {
        return Err(TelemetryError::AlreadyInitialised);
    }
    let filter =
        EnvFilter::try_new(&config.filter).map_err(|e| TelemetryError::BadFilter(e.to_string()))?;
    let span_filter = EnvFilter::try_new(&config.span_filter)
        .map_err(|e| TelemetryError::BadFilter(format!("LMFORGE_TRACE_FILTER: {e}")))?;

    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = Resource::builder()
        .with_service_name(config.service_name.clone())
        .build();
    // The provider exists even without an exporter so that spans get trace ids and those
    // ids propagate across services (and show up in logs); only export is optional.
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let mut export = None;
    if let Some(endpoint) = &config.otlp_endpoint {
        let (runtime, processor) = otlp::ExportRuntime::new(endpoint, config.export_delay)?;
        builder = builder.with_span_processor(processor);
        export = Some(runtime);
    }
    let provider = builder.build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("lmforge"))
        .with_filter(span_filter);

    let registry = tracing_subscriber::registry().with(otel_layer);
    let result = match config.log_format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal())
                    .with_target(true)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_filter(filter),
            )
            .try_init(),
    };
    result.map_err(|_| TelemetryError::AlreadyInitialised)?;
    metrics::install_recorder();
    Ok(TelemetryGuard { provider, export })
}
