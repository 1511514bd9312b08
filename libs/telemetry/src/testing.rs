//! Test support (feature `testing`): an in-process OTLP/gRPC trace collector, so that a test
//! can check which spans the services really exported, across processes too.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
pub use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::net::TcpListener;

/// Lowercase hex of an id (trace and span ids as W3C `traceparent` writes them).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/gRPC trace collector on an ephemeral port that keeps every span it receives with
/// its resource's `service.name`, so a test can check what the services exported.
#[derive(Debug, Clone)]
pub struct OtlpCollector {
    /// `http://127.0.0.1:port`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for OtlpCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.spans.lock().expect("collector lock");
        for resource_spans in request.into_inner().resource_spans {
            let service_name = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    kept.push((service_name.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl OtlpCollector {
    /// Starts the collector.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let collector = Self {
            endpoint: format!("http://{}", listener.local_addr().expect("bound")),
            spans: Default::default(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        collector
    }

    /// Every span received so far, with its service name.
    pub fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().expect("collector lock").clone()
    }

    /// `service: span name` of every span received so far (for failure messages).
    pub fn summary(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .spans
            .lock()
            .expect("collector lock")
            .iter()
            .map(|(service, span)| format!("{service}: {}", span.name))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Every span of trace `trace_id` (hex) received so far, with its service name.
    pub fn trace(&self, trace_id: &str) -> Vec<(String, Span)> {
        self.spans
            .lock()
            .expect("collector lock")
            .iter()
            .filter(|(_, span)| hex(&span.trace_id) == trace_id)
            .cloned()
            .collect()
    }

    /// The trace id (hex) of the first span received that `matches` (service name, span).
    pub fn trace_of(&self, matches: impl Fn(&str, &Span) -> bool) -> Option<String> {
        self.spans
            .lock()
            .expect("collector lock")
            .iter()
            .find(|(service, span)| matches(service, span))
            .map(|(_, span)| hex(&span.trace_id))
    }
}

/// The string value of a span attribute.
pub fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}
