//! Trace context crosses a real NATS server in message headers: the receiver's context has
//! the publisher's trace id and span id. Needs `LMFORGE_NATS_URL` (`make test` sets it).

use std::time::Duration;

use futures::StreamExt;
use lmforge_telemetry::propagation::{extract_nats_context, inject_nats_headers};
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

#[tokio::test]
async fn trace_context_travels_in_nats_headers() {
    let url = std::env::var("LMFORGE_NATS_URL")
        .expect("LMFORGE_NATS_URL must point at a NATS server: run `make test` or `make services`");
    let _guard = lmforge_telemetry::init("nats-propagation-test").expect("first init");
    let client = async_nats::connect(&url).await.expect("NATS answers");

    // A subject of this test's own, so parallel runs never see each other's messages.
    let subject = format!("lmforge.test.propagation.{}", std::process::id());
    let mut subscription = client.subscribe(subject.clone()).await.expect("subscribe");

    let span = tracing::info_span!("test.publish");
    let sent = span.context().span().span_context().clone();
    assert!(sent.is_valid(), "the publishing span has a trace id");
    let mut headers = async_nats::HeaderMap::new();
    {
        let _entered = span.enter();
        inject_nats_headers(&mut headers);
    }
    client
        .publish_with_headers(subject, headers, "payload".into())
        .await
        .expect("publish");

    let message = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("message arrives in time")
        .expect("subscription open");
    let received = extract_nats_context(message.headers.as_ref());
    let received = received.span().span_context().clone();
    assert_eq!(received.trace_id(), sent.trace_id());
    assert_eq!(received.span_id(), sent.span_id());
    assert!(received.is_remote());

    // A message without headers yields an empty context rather than an error.
    assert!(!extract_nats_context(None).span().span_context().is_valid());
}
