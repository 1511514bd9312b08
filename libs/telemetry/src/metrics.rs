//! Prometheus metrics.
//!
//! One process-wide `metrics` recorder renders the Prometheus text format for every admin
//! port ([`render`]). [`GrpcMetricsLayer`] wraps a tonic server and counts each RPC by
//! service, method and status code, with a latency histogram measured until the last
//! byte of the response (so a streaming call counts its whole stream). Names follow
//! go-grpc-prometheus: `grpc_server_started_total`, `grpc_server_handled_total`,
//! `grpc_server_handling_seconds`.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tower::{Layer, Service};

/// Latency buckets in seconds, from sub-millisecond RPCs to minute-long streams.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder once; later calls return the same handle.
pub fn install_recorder() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), LATENCY_BUCKETS)
            .expect("the bucket list is a non-empty constant");
        match builder.install_recorder() {
            Ok(handle) => handle,
            // Another recorder is already global (a test harness, say): keep a private one
            // so that rendering still works, even if it sees nothing.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        }
    })
}

/// The Prometheus text exposition of every metric recorded in this process.
pub fn render() -> String {
    install_recorder().render()
}

/// Canonical upper-case name of a gRPC status code (`OK`, `INVALID_ARGUMENT`, …).
pub fn grpc_code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn status_from_headers(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers.get("grpc-status")?;
    let number: i32 = value.to_str().ok()?.trim().parse().ok()?;
    Some(tonic::Code::from_i32(number))
}

/// Tower layer recording per-RPC metrics on a tonic server, labelled with `server`.
#[derive(Debug, Clone)]
pub struct GrpcMetricsLayer {
    server: &'static str,
}

impl GrpcMetricsLayer {
    /// `server` becomes the `server` label (the lmforge service name).
    pub fn new(server: &'static str) -> Self {
        install_recorder();
        Self { server }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            server: self.server,
        }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    server: &'static str,
}

/// One RPC in flight; records its outcome exactly once, as `CANCELLED` if the response is
/// dropped before its status was seen (the client went away).
#[derive(Debug)]
struct CallRecord {
    server: &'static str,
    service: String,
    method: String,
    started: Instant,
    done: bool,
}

impl CallRecord {
    fn finish(&mut self, code: tonic::Code) {
        if self.done {
            return;
        }
        self.done = true;
        let labels = [
            ("server", self.server.to_owned()),
            ("grpc_service", self.service.clone()),
            ("grpc_method", self.method.clone()),
            ("grpc_code", grpc_code_name(code).to_owned()),
        ];
        metrics::counter!("grpc_server_handled_total", &labels).increment(1);
        metrics::histogram!("grpc_server_handling_seconds", &labels)
            .record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.finish(tonic::Code::Cancelled);
    }
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body,
{
    type Response = http::Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let (service, method) = crate::propagation::split_grpc_path(request.uri().path());
        let mut record = CallRecord {
            server: self.server,
            service: service.to_owned(),
            method: method.to_owned(),
            started: Instant::now(),
            done: false,
        };
        metrics::counter!(
            "grpc_server_started_total",
            "server" => record.server,
            "grpc_service" => record.service.clone(),
            "grpc_method" => record.method.clone(),
        )
        .increment(1);
        let future = self.inner.call(request);
        Box::pin(async move {
            match future.await {
                Ok(response) => {
                    // A trailers-only response (every error, typically) carries its status
                    // in the headers; otherwise it comes in the trailers at the body's end.
                    if let Some(code) = status_from_headers(response.headers()) {
                        record.finish(code);
                    }
                    Ok(response.map(|inner| MetricsBody {
                        inner,
                        record: Some(record),
                    }))
                }
                Err(error) => {
                    record.finish(tonic::Code::Internal);
                    Err(error)
                }
            }
        })
    }
}

pin_project_lite::pin_project! {
    /// Response body that records the RPC's status when its trailers pass by.
    pub struct MetricsBody<B> {
        #[pin]
        inner: B,
        record: Option<CallRecord>,
    }
}

impl<B: Body> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(mut record) = this.record.take()
                {
                    record.finish(status_from_headers(trailers).unwrap_or(tonic::Code::Unknown));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut record) = this.record.take() {
                    record.finish(tonic::Code::Internal);
                }
            }
            Poll::Ready(None) => {
                if let Some(mut record) = this.record.take() {
                    // Ended without trailers: only a trailers-only response does that, and
                    // its status was recorded from the headers already.
                    record.finish(tonic::Code::Unknown);
                }
            }
            Poll::Pending => {}
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
    fn status_codes_read_from_headers() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(status_from_headers(&headers), None);
        headers.insert("grpc-status", http::HeaderValue::from_static("3"));
        assert_eq!(
            status_from_headers(&headers),
            Some(tonic::Code::InvalidArgument)
        );
        assert_eq!(
            grpc_code_name(tonic::Code::InvalidArgument),
            "INVALID_ARGUMENT"
        );
    }
}
