//! HTTP servers (axum): a server span per request, parented to the caller's W3C
//! `traceparent`, and per-request metrics.
//!
//! Add [`trace_http`] to a router with
//! `.layer(axum::middleware::from_fn_with_state("service", trace_http))` (a `Router::layer`,
//! so that the matched route is known). The span and the latency cover the whole response
//! body, so a server-sent-event stream counts until its last event. Metrics:
//!
//! - `http_server_requests_total{server, method, route, status}`: responses, counted when
//!   the body ends (or is dropped, when the client goes away);
//! - `http_server_request_duration_seconds{server, method, route, status}`: a histogram of
//!   the time from the request to the end of its response body.
//!
//! `route` is the matched route template (`/v1/chat/completions`), `unmatched` when no route
//! matched; `status` is the numeric HTTP status.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http_body::{Body, Frame};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Counter of HTTP responses.
pub const REQUESTS_TOTAL: &str = "http_server_requests_total";
/// Histogram of HTTP request durations, in seconds, until the end of the response body.
pub const REQUEST_DURATION_SECONDS: &str = "http_server_request_duration_seconds";
/// The `route` label of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The method as a bounded label: standard methods by name, anything else `_OTHER`.
fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// The span for one incoming HTTP request on `route` (the matched route template, if any),
/// parented to the trace context in `headers` (a new trace when there is none).
pub fn server_span(
    method: &http::Method,
    route: Option<&str>,
    headers: &http::HeaderMap,
) -> tracing::Span {
    let method = method_label(method);
    let span = match route {
        Some(route) => tracing::info_span!(
            "http.server",
            otel.name = %format_args!("{method} {route}"),
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = method,
            http.route = route,
            http.response.status_code = tracing::field::Empty,
        ),
        None => tracing::info_span!(
            "http.server",
            otel.name = method,
            otel.kind = "server",
            otel.status_code = tracing::field::Empty,
            http.request.method = method,
            http.response.status_code = tracing::field::Empty,
        ),
    };
    // Fails only when no OpenTelemetry layer is installed: nothing to link to then.
    let _ = span.set_parent(crate::propagation::extract_http_context(headers));
    span
}

/// Axum middleware: runs the request inside an [`server_span`] and records the metrics of
/// the module doc; the state is the `server` label (the service name).
pub async fn trace_http(
    State(server): State<&'static str>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let matched = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned());
    let method = request.method().clone();
    let span = server_span(&method, matched.as_deref(), request.headers());
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "error");
    }
    let record = RequestRecord {
        server,
        method: method_label(&method),
        route: matched.unwrap_or_else(|| UNMATCHED_ROUTE.to_owned()),
        status: status.as_u16(),
        started,
        span: Some(span),
    };
    response.map(|inner| {
        axum::body::Body::new(TracedBody {
            inner,
            record: Some(record),
        })
    })
}

/// One request whose response is being sent; records its metrics and closes its span once.
#[derive(Debug)]
struct RequestRecord {
    server: &'static str,
    method: &'static str,
    route: String,
    status: u16,
    started: Instant,
    span: Option<tracing::Span>,
}

impl RequestRecord {
    fn finish(&mut self) {
        let Some(span) = self.span.take() else {
            return;
        };
        let labels = [
            ("server", self.server.to_owned()),
            ("method", self.method.to_owned()),
            ("route", self.route.clone()),
            ("status", self.status.to_string()),
        ];
        metrics::counter!(REQUESTS_TOTAL, &labels).increment(1);
        metrics::histogram!(REQUEST_DURATION_SECONDS, &labels)
            .record(self.started.elapsed().as_secs_f64());
        drop(span);
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.finish();
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request's span open, and polls inside it, until its
    /// end.
    struct TracedBody<B> {
        #[pin]
        inner: B,
        record: Option<RequestRecord>,
    }
}

impl<B: Body> Body for TracedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = {
            let _entered = this
                .record
                .as_ref()
                .and_then(|r| r.span.as_ref())
                .map(tracing::Span::enter);
            this.inner.poll_frame(cx)
        };
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_))))
            && let Some(mut record) = this.record.take()
        {
            record.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_bounded_labels() {
        assert_eq!(method_label(&http::Method::POST), "POST");
        let odd = http::Method::from_bytes(b"BREW").expect("method");
        assert_eq!(method_label(&odd), "_OTHER");
    }
}
