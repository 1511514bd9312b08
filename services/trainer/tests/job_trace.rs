//! A training job is one trace: the SubmitJob call, its dispatch over NATS, the worker's
//! `trainer.job` span, every report the worker sends back, and the registration of the result
//! in the registry share the submit's trace id.
//! (Its own test binary: it installs the global tracing subscriber.)

mod common;

use std::time::Duration;

use common::{JobsTuning, Stack, spec};
use lmforge_proto::v1 as pb;
use opentelemetry::trace::TracerProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_is_one_trace_from_submit_through_training() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).expect("subscriber");

    let mut stack = Stack::start("jobs_trace", JobsTuning::default()).await;
    stack.import_base("base-tiny").await;
    let dataset = stack.upload_dataset("support", 30).await;
    stack.start_worker("traced").await;
    let job = stack
        .submit(spec("base-tiny/1", &dataset, "traced-out", 2))
        .await
        .expect("submit");
    let done = stack
        .wait_for(
            &job.id,
            &[pb::JobState::Succeeded, pb::JobState::Failed],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(
        done.state,
        pb::JobState::Succeeded as i32,
        "{:?}",
        done.failure
    );
    // The worker's span closes once the message is settled, just after the job is SUCCEEDED.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (submit, worker, reports, registered) = loop {
        let spans = exporter.get_finished_spans().expect("spans");
        let submit = spans
            .iter()
            .find(|s| s.name == "lmforge.v1.JobService/SubmitJob")
            .map(|s| s.span_context.trace_id());
        let worker: Vec<_> = spans
            .iter()
            .filter(|s| s.name == "trainer.job")
            .map(|s| s.span_context.trace_id())
            .collect();
        let reports: Vec<_> = spans
            .iter()
            .filter(|s| s.name == "jobs.report")
            .map(|s| s.span_context.trace_id())
            .collect();
        let registered: Vec<_> = spans
            .iter()
            .filter(|s| {
                s.name == "lmforge.v1.RegistryService/CreateModelVersion"
                    || s.name == "lmforge.v1.RegistryService/FinalizeModelVersion"
            })
            .map(|s| s.span_context.trace_id())
            .collect();
        if (submit.is_some() && !worker.is_empty()) || std::time::Instant::now() > deadline {
            break (
                submit.expect("a SubmitJob server span"),
                worker,
                reports,
                registered,
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        worker,
        vec![submit],
        "the worker's span continues the submit's trace"
    );
    assert!(
        reports.len() >= 3,
        "started, progress and succeeded reports: {reports:?}"
    );
    assert!(
        reports.iter().all(|t| *t == submit),
        "every report of the job is in the job's trace"
    );
    // The registry's server spans of the registration (the base model's import by the test
    // is a separate trace).
    assert!(
        registered.iter().filter(|t| **t == submit).count() >= 2,
        "the registration is in the job's trace: {registered:?} vs {submit:?}"
    );
    stack.stop().await;
}
