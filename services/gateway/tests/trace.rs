//! A request to the OpenAI HTTP API is one trace from the gateway to inference: the gateway's
//! `http.server` span (continuing the client's `traceparent` when it sends one), its
//! `grpc.client` call, and the `traceparent` inference receives share one trace id. Also the
//! `http_server_*` metrics.
//! (Its own test binary: it installs the global tracing subscriber.)

mod common;

use std::time::Duration;

use common::{MockInference, Script, TestGateway, bearer, user_chat};
use lmforge_proto::v1 as pb;
use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use serde_json::json;
use tracing_subscriber::layer::SubscriberExt;

const ROUTING: &str = r#"
allow_model_refs: false
models:
  - name: tiny
    targets: ["tiny@production"]
"#;

const CLIENT_UNARY: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const CLIENT_STREAM: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

/// (trace id, parent span id) of a W3C `traceparent`.
fn parse_traceparent(value: &str) -> (TraceId, SpanId) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent `{value}`");
    (
        TraceId::from_hex(parts[1]).expect("trace id"),
        SpanId::from_hex(parts[2]).expect("span id"),
    )
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|KeyValue { key: k, .. }| k.as_str() == key)
        .map(|kv| &kv.value)
}

/// Sends a chat completion; returns the HTTP status and the body.
async fn send(
    gw: &TestGateway,
    key: &str,
    body: &serde_json::Value,
    traceparent: Option<&str>,
) -> (u16, String) {
    let mut request = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.http))
        .bearer_auth(key)
        .json(body);
    if let Some(traceparent) = traceparent {
        request = request.header("traceparent", traceparent);
    }
    let response = request.send().await.expect("send");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// Waits until the exporter holds a finished span that `find` picks.
async fn wait_for_span(
    exporter: &InMemorySpanExporter,
    what: &str,
    find: impl Fn(&SpanData) -> bool,
) -> SpanData {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let spans = exporter.get_finished_spans().expect("spans");
        if let Some(span) = spans.into_iter().find(&find) {
            return span;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {what} span among {:#?}",
            exporter
                .get_finished_spans()
                .expect("spans")
                .iter()
                .map(|s| (s.name.clone(), s.span_context.trace_id()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Checks that the call inference received as its `index`-th carries the trace of one HTTP
/// server span for `/v1/chat/completions`, through the gateway's `grpc.client` span; and,
/// when the client sent `client`, that this is the client's trace.
async fn assert_one_trace(
    exporter: &InMemorySpanExporter,
    mock: &MockInference,
    index: usize,
    rpc: &str,
    client: Option<&str>,
) {
    let received = mock.traceparents.lock().expect("traceparents")[index].clone();
    let received = received
        .unwrap_or_else(|| panic!("inference call {index} ({rpc}) came without a traceparent"));
    let (trace_id, parent_id) = parse_traceparent(&received);

    let http = wait_for_span(exporter, "HTTP server", |s| {
        s.name == "POST /v1/chat/completions" && s.span_context.trace_id() == trace_id
    })
    .await;
    assert_eq!(http.span_kind, SpanKind::Server);
    assert_eq!(
        attribute(&http, "http.request.method"),
        Some(&Value::from("POST"))
    );
    assert_eq!(
        attribute(&http, "http.route"),
        Some(&Value::from("/v1/chat/completions"))
    );
    assert_eq!(
        attribute(&http, "http.response.status_code"),
        Some(&Value::I64(200))
    );

    // Inference's parent is the gateway's client span of that call, a child of the HTTP span.
    let call = wait_for_span(exporter, "gRPC client", |s| {
        s.span_context.span_id() == parent_id
    })
    .await;
    assert_eq!(call.name, format!("lmforge.v1.InferenceService/{rpc}"));
    assert_eq!(call.span_kind, SpanKind::Client);
    assert_eq!(call.span_context.trace_id(), trace_id);
    assert_eq!(call.parent_span_id, http.span_context.span_id());

    match client {
        Some(client) => {
            let (client_trace, client_span) = parse_traceparent(client);
            assert_eq!(trace_id, client_trace, "the client's trace continues");
            assert_eq!(http.parent_span_id, client_span);
        }
        None => assert_eq!(
            http.parent_span_id,
            SpanId::INVALID,
            "without a traceparent the HTTP span starts the trace"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_request_is_one_trace_through_inference() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).expect("subscriber");

    let mock = MockInference::default();
    mock.script("tiny@production", Script::chunks(&["hello", " there"]));
    let gw = TestGateway::start("trace", mock.start().await, ROUTING).await;
    let (_, key) = gw.key("app", &["tiny"], 0, 0).await;

    // Unary, deterministic (so through the cache's merged flight), then not.
    let chat = |text: &str, extra: serde_json::Value| {
        let mut body = json!({"model": "tiny", "messages": [{"role": "user", "content": text}]});
        body.as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        body
    };
    let (status, body) = send(&gw, &key, &chat("one", json!({"temperature": 0})), None).await;
    assert_eq!(status, 200, "{body}");
    assert_one_trace(&exporter, &mock, 0, "Generate", None).await;

    let (status, body) = send(
        &gw,
        &key,
        &chat("two", json!({"temperature": 0.5})),
        Some(CLIENT_UNARY),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_one_trace(&exporter, &mock, 1, "Generate", Some(CLIENT_UNARY)).await;

    // Streamed: the relay task runs in the request's span too.
    let (status, body) = send(
        &gw,
        &key,
        &chat("three", json!({"stream": true, "temperature": 0})),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("data: [DONE]"), "{body}");
    assert_one_trace(&exporter, &mock, 2, "GenerateStream", None).await;

    let (status, body) = send(
        &gw,
        &key,
        &chat("four", json!({"stream": true})),
        Some(CLIENT_STREAM),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("data: [DONE]"), "{body}");
    assert_one_trace(&exporter, &mock, 3, "GenerateStream", Some(CLIENT_STREAM)).await;

    // A refused request still gets its span, with its status.
    let (status, _) = send(&gw, "lmf_wrong", &chat("five", json!({})), None).await;
    assert_eq!(status, 401);
    let refused = wait_for_span(&exporter, "refused HTTP server", |s| {
        s.name == "POST /v1/chat/completions"
            && attribute(s, "http.response.status_code") == Some(&Value::I64(401))
    })
    .await;
    assert_eq!(refused.span_kind, SpanKind::Server);

    // The gRPC front continues the caller's trace through to inference as well.
    const CLIENT_GRPC: &str = "00-5bf92f3577b34da6a3ce929d0e0e4737-10f067aa0ba902b7-01";
    let mut openai =
        pb::open_ai_service_client::OpenAiServiceClient::connect(format!("http://{}", gw.grpc))
            .await
            .expect("connect");
    let mut request = bearer(&key, user_chat("tiny", "six"));
    request
        .metadata_mut()
        .insert("traceparent", CLIENT_GRPC.parse().expect("ascii"));
    openai
        .create_chat_completion(request)
        .await
        .expect("grpc chat");
    let received = mock.traceparents.lock().expect("traceparents")[4]
        .clone()
        .expect("the gRPC front's call to inference carries a traceparent");
    let (trace_id, parent_id) = parse_traceparent(&received);
    assert_eq!(trace_id, parse_traceparent(CLIENT_GRPC).0);
    let call = wait_for_span(&exporter, "gRPC client", |s| {
        s.span_context.span_id() == parent_id
    })
    .await;
    let server = wait_for_span(&exporter, "gRPC server", |s| {
        s.span_context.span_id() == call.parent_span_id
    })
    .await;
    assert_eq!(server.span_kind, SpanKind::Server);
    assert!(
        server.name.ends_with("/CreateChatCompletion"),
        "{}",
        server.name
    );

    // The HTTP metrics, by route and status.
    let metrics = lmforge_telemetry::metrics::render();
    let line = |name: &str, status: &str| {
        metrics.lines().any(|l| {
            l.starts_with(name)
                && l.contains("server=\"gateway\"")
                && l.contains("route=\"/v1/chat/completions\"")
                && l.contains(&format!("status=\"{status}\""))
        })
    };
    assert!(line("http_server_requests_total{", "200"), "{metrics}");
    assert!(line("http_server_requests_total{", "401"), "{metrics}");
    assert!(
        line("http_server_request_duration_seconds_bucket{", "200"),
        "{metrics}"
    );

    gw.stop().await;
}
