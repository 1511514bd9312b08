//! A call crossing two tonic servers yields one trace: the caller's span, then for each hop
//! a `grpc.client` span and the callee's `grpc.server` span, each the parent of the next.
//! Spans are exported over OTLP/gRPC to a collector that this test runs itself
//! (`lmforge_telemetry::testing`).

use std::pin::Pin;
use std::time::Duration;

use lmforge_telemetry::propagation::{TracedChannel, server_span, traced_channel};
use lmforge_telemetry::testing::{OtlpCollector, Span};
use lmforge_telemetry::{TelemetryConfig, metrics::GrpcMetricsLayer};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic::{Request, Response, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tracing::Instrument;

/// Front server: answers a health check by asking the back server.
struct Front {
    back: HealthClient<TracedChannel>,
}

#[tonic::async_trait]
impl Health for Front {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let mut back = self.back.clone();
        back.check(request.into_inner()).await
    }

    type WatchStream = Pin<
        Box<dyn tokio_stream::Stream<Item = Result<HealthCheckResponse, Status>> + Send + 'static>,
    >;

    async fn watch(
        &self,
        _request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("not needed by this test"))
    }
}

async fn bind() -> (TcpListener, String) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    (listener, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_two_grpc_hops() {
    let collector = OtlpCollector::start().await;
    let collector_url = collector.endpoint.clone();

    let mut config = TelemetryConfig::from_env("telemetry-test").expect("default env");
    config.otlp_endpoint = Some(collector_url);
    config.export_delay = Duration::from_millis(100);
    let guard = lmforge_telemetry::init_with(config).expect("first init in this process");

    // Back: the stock health service. Front: calls back. Both trace and count requests.
    let (back_listener, back_url) = bind().await;
    let (reporter, back_health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tokio::spawn(
        Server::builder()
            .trace_fn(server_span)
            .layer(GrpcMetricsLayer::new("back"))
            .add_service(back_health)
            .serve_with_incoming(TcpListenerStream::new(back_listener)),
    );
    let back = HealthClient::new(traced_channel(
        Channel::from_shared(back_url)
            .expect("valid url")
            .connect_lazy(),
    ));
    let (front_listener, front_url) = bind().await;
    tokio::spawn(
        Server::builder()
            .trace_fn(server_span)
            .layer(GrpcMetricsLayer::new("front"))
            .add_service(HealthServer::new(Front { back }))
            .serve_with_incoming(TcpListenerStream::new(front_listener)),
    );

    let mut front = HealthClient::new(traced_channel(
        Channel::from_shared(front_url)
            .expect("valid url")
            .connect_lazy(),
    ));
    let root = tracing::info_span!("test.request");
    let status = async { front.check(HealthCheckRequest::default()).await }
        .instrument(root.clone())
        .await
        .expect("front answers")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    drop(root);

    let guard = tokio::task::spawn_blocking(move || {
        guard.flush();
        guard
    })
    .await
    .expect("flush thread");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = collector.spans();
        if spans.len() >= 5 || tokio::time::Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let names: Vec<&str> = spans.iter().map(|(_, s)| s.name.as_str()).collect();
    let find = |name: &str, nth: usize| -> &Span {
        spans
            .iter()
            .map(|(_, s)| s)
            .filter(|s| s.name == name)
            .nth(nth)
            .unwrap_or_else(|| panic!("no span {name} #{nth} among {names:?}"))
    };

    let root = find("test.request", 0);
    assert!(root.parent_span_id.is_empty(), "the test span is the root");
    // The spans of each hop, found by following parent links from the root.
    let child_of = |parent: &Span, name: &str| -> Span {
        spans
            .iter()
            .map(|(_, s)| s)
            .find(|s| s.name.starts_with(name) && s.parent_span_id == parent.span_id)
            .unwrap_or_else(|| panic!("no {name} span under {} among {names:?}", parent.name))
            .clone()
    };
    let client_to_front = child_of(root, "grpc.health.v1.Health/Check");
    let front_server = child_of(&client_to_front, "grpc.health.v1.Health/Check");
    let client_to_back = child_of(&front_server, "grpc.health.v1.Health/Check");
    let back_server = child_of(&client_to_back, "grpc.health.v1.Health/Check");

    use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
    assert_eq!(client_to_front.kind, SpanKind::Client as i32);
    assert_eq!(front_server.kind, SpanKind::Server as i32);
    assert_eq!(client_to_back.kind, SpanKind::Client as i32);
    assert_eq!(back_server.kind, SpanKind::Server as i32);
    for span in [
        &client_to_front,
        &front_server,
        &client_to_back,
        &back_server,
    ] {
        assert_eq!(
            span.trace_id, root.trace_id,
            "{} is in the root's trace",
            span.name
        );
    }
    assert!(
        spans.iter().all(|(service, _)| service == "telemetry-test"),
        "spans carry the service name"
    );

    // Both servers counted their call, labelled by server, method and status code.
    let exposition = lmforge_telemetry::metrics::render();
    for server in ["front", "back"] {
        let line = exposition
            .lines()
            .find(|l| {
                l.starts_with("grpc_server_handled_total")
                    && l.contains(&format!("server=\"{server}\""))
                    && l.contains("grpc_method=\"Check\"")
                    && l.contains("grpc_code=\"OK\"")
            })
            .unwrap_or_else(|| panic!("no handled counter for {server} in:\n{exposition}"));
        assert!(line.ends_with(" 1"), "one call counted: {line}");
        assert!(
            exposition.contains(&format!(
                "grpc_server_handling_seconds_count{{server=\"{server}\",grpc_service=\"grpc.health.v1.Health\",grpc_method=\"Check\",grpc_code=\"OK\"}} 1"
            )),
            "latency histogram for {server}:\n{exposition}"
        );
    }

    tokio::task::spawn_blocking(move || guard.shutdown())
        .await
        .expect("shutdown thread");
}
