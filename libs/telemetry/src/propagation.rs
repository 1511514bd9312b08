//! W3C trace context across process boundaries.
//!
//! - gRPC server: pass [`server_span`] to tonic's `Server::builder().trace_fn(…)`; each
//!   request gets a `grpc.server` span whose parent is the caller's `traceparent`.
//! - gRPC client: wrap the channel with [`TraceContextLayer`] (or call [`traced_channel`]);
//!   each call gets a `grpc.client` span, and its context goes out as `traceparent`.
//! - NATS: [`inject_nats_headers`] before publishing, [`extract_nats_context`] on receipt.

use std::task::{Context as TaskContext, Poll};

use opentelemetry::Context;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tower::{Layer, Service};
use tracing::Instrument;
use tracing::instrument::Instrumented;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Reads propagation fields from HTTP/2 headers (gRPC metadata).
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes propagation fields into HTTP/2 headers (gRPC metadata).
struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// The trace context carried by incoming headers (empty when there is none).
pub fn extract_http_context(headers: &http::HeaderMap) -> Context {
    opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
}

/// Writes the context of `span` into outgoing headers as `traceparent`/`tracestate`.
pub fn inject_http_headers(span: &tracing::Span, headers: &mut http::HeaderMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut HeaderInjector(headers));
    });
}

/// Splits a gRPC path `/pkg.Service/Method` into (`pkg.Service`, `Method`).
pub fn split_grpc_path(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// The span for one incoming gRPC request, parented to the caller's trace context.
/// Meant for `tonic::transport::Server::builder().trace_fn(server_span)`.
///
/// Health checks and reflection calls that arrive without a trace context are not traced:
/// probes and load balancers would otherwise fill the trace store with one-span traces.
pub fn server_span(request: &http::Request<()>) -> tracing::Span {
    let path = request.uri().path();
    let parent = extract_http_context(request.headers());
    let infrastructure =
        path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.");
    if infrastructure && !parent.span().span_context().is_valid() {
        return tracing::Span::none();
    }
    let (service, method) = split_grpc_path(path);
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
    );
    // Fails only when no OpenTelemetry layer is installed, in which case there is nothing
    // to link to anyway.
    let _ = span.set_parent(parent);
    span
}

/// Tower layer for gRPC client channels: a `grpc.client` span per call, whose context is
/// injected into the request metadata.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextLayer;

impl<S> Layer<S> for TraceContextLayer {
    type Service = TraceContextService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContextService { inner }
    }
}

/// See [`TraceContextLayer`].
#[derive(Debug, Clone)]
pub struct TraceContextService<S> {
    inner: S,
}

/// A tonic channel whose calls carry trace context; what generated clients are built on.
pub type TracedChannel = TraceContextService<tonic::transport::Channel>;

/// Wraps a channel so that every call is traced and propagates context.
pub fn traced_channel(channel: tonic::transport::Channel) -> TracedChannel {
    TraceContextLayer.layer(channel)
}

impl<S, B> Service<http::Request<B>> for TraceContextService<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let (service, method) = split_grpc_path(request.uri().path());
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = %format_args!("{service}/{method}"),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
        );
        inject_http_headers(&span, request.headers_mut());
        self.inner.call(request).instrument(span)
    }
}

/// Reads propagation fields from NATS message headers.
struct NatsExtractor<'a>(&'a async_nats::HeaderMap);

impl Extractor for NatsExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(async_nats::HeaderValue::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// Writes propagation fields into NATS message headers.
struct NatsInjector<'a>(&'a mut async_nats::HeaderMap);

impl Injector for NatsInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

/// Writes the current span's trace context into headers of a message about to be published.
pub fn inject_nats_headers(headers: &mut async_nats::HeaderMap) {
    inject_nats_headers_from(&tracing::Span::current(), headers);
}

/// Writes `span`'s trace context into NATS headers.
pub fn inject_nats_headers_from(span: &tracing::Span, headers: &mut async_nats::HeaderMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&cx, &mut NatsInjector(headers));
    });
}

/// The trace context a received NATS message carries (empty without headers); use it with
/// `span.set_parent(…)` on the span that processes the message.
pub fn extract_nats_context(headers: Option<&async_nats::HeaderMap>) -> Context {
    match headers {
        Some(headers) => {
            opentelemetry::global::get_text_map_propagator(|p| p.extract(&NatsExtractor(headers)))
        }
        None => Context::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_paths_split_into_service_and_method() {
        assert_eq!(
            split_grpc_path("/lmforge.v1.JobService/SubmitJob"),
            ("lmforge.v1.JobService", "SubmitJob")
        );
        assert_eq!(split_grpc_path("/weird"), ("weird", ""));
    }
}
