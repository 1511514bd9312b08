//! Each engine step is its own span, linked to the spans of the requests it served.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use lmforge_inference::engine::{self, EngineConfig, EngineRequest, Event};
use lmforge_model::sampling::SamplingParams;
use lmforge_model::stopping::StopConfig;
use lmforge_model::tokenizer::TextTokenizer;
use lmforge_model::{Model, hf};
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_steps_link_to_the_requests_they_serve() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).expect("subscriber");

    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../libs/model/fixtures/tiny-llama");
    let ckpt = hf::load_checkpoint(&dir, DType::F32, &Device::Cpu).expect("checkpoint");
    let model = Model::new(&ckpt.config, &ckpt.weights).expect("model");
    let tok = Arc::new(TextTokenizer::from_dir(&dir).expect("tokenizer"));
    let handle = engine::spawn(model, tok, EngineConfig::default(), "tiny").expect("engine");

    let mut ids = Vec::new();
    let mut rxs = Vec::new();
    for i in 0..2u32 {
        let span = tracing::info_span!("request", i);
        let cx = span.context().span().span_context().clone();
        assert!(cx.is_valid());
        ids.push(cx.span_id());
        rxs.push((
            span,
            handle
                .submit(EngineRequest {
                    id: format!("r{i}"),
                    prompt: vec![5 + i, 6, 7, 8],
                    sampling: SamplingParams::greedy(),
                    stop: StopConfig {
                        max_tokens: Some(4),
                        ..Default::default()
                    },
                    min_tokens: 0,
                    logit_bias: vec![],
                    format: None,
                    n: 1,
                    priority: 0,
                    deadline: None,
                    arrived: Instant::now(),
                    span: cx,
                })
                .expect("submit"),
        ));
    }
    for (span, mut rx) in rxs {
        while let Some(e) = rx.recv().await {
            if matches!(e, Event::Finished { .. }) {
                break;
            }
        }
        drop(span);
    }
    handle.shutdown();
    // The last step's span closes on the engine thread after it sent the final event: wait
    // for it rather than racing it.
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let spans = loop {
        let _ = provider.force_flush();
        let spans = exporter.get_finished_spans().expect("spans");
        let steps = spans.iter().filter(|s| s.name == "engine.step").count();
        if steps >= 4 || Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let steps: Vec<_> = spans.iter().filter(|s| s.name == "engine.step").collect();
    assert!(steps.len() >= 4, "one span per step: {}", steps.len());
    for id in &ids {
        assert!(
            steps
                .iter()
                .any(|s| s.links.iter().any(|l| l.span_context.span_id() == *id)),
            "a step links to request span {id}"
        );
    }
    // Steps are their own traces' roots, not children of a request.
    assert!(
        steps
            .iter()
            .all(|s| s.parent_span_id == opentelemetry::trace::SpanId::INVALID)
    );
}
