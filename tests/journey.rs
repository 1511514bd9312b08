//! The day-one journey end to end, with tiny settings: the stack in-process on ephemeral
//! ports against real Postgres and NATS JetStream, trainer workers as `lmforge-trainer`
//! processes, and every span exported over OTLP to a collector this test runs.
//!
//! It uploads the bundled bank-adviser data, trains a base model from scratch, fine-tunes it
//! while the worker running the job is killed with SIGKILL (a second worker finishes it from
//! the checkpoint), promotes the result to `production` and asks through the gateway. Then:
//! one trace per chat request spans gateway → inference; one trace per training job spans
//! jobs → NATS → trainer (another process) → registry; every service exposes Prometheus
//! metrics. (Its own test binary: it installs the process's telemetry.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lmforge::journey::{Endpoints, Journey, JourneyOptions};
use lmforge::stack::{Stack, StackOptions};
use lmforge_e2e::{OtlpCollector, Span, attribute, drop_schemas, nats_url, stack_options};
use lmforge_proto::v1 as pb;

/// OTLP `SPAN_KIND_SERVER`.
const SERVER: i32 = 2;

/// A workspace binary (`lmforge-trainer`, `lmforge`), built beside this test by
/// `cargo test --workspace` (`make test`).
fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --bin {name}` (make test builds it)",
        bin.display()
    );
    bin
}

/// A trainer worker process, killed when dropped (also when the test fails).
struct Trainer(Child);

impl Trainer {
    /// SIGKILL, and reap it.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Trainer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts a trainer worker process on the stack's work queue.
fn spawn_trainer(stack: &Stack, worker_id: &str, artifacts: &Path, otlp: &str) -> Trainer {
    let url = |name: &str| format!("http://{}", stack.service(name).expect(name).grpc);
    let cache = artifacts.join(format!("cache-{worker_id}"));
    Command::new(binary("lmforge-trainer"))
        .envs([
            ("LMFORGE_NATS_URL", nats_url()),
            ("LMFORGE_REGISTRY_URL", url("registry")),
            ("LMFORGE_INGEST_URL", url("ingest")),
            ("LMFORGE_ARTIFACTS", artifacts.display().to_string()),
            ("LMFORGE_TRAINER_CACHE_DIR", cache.display().to_string()),
            ("LMFORGE_TRAINER_WORKER_ID", worker_id.to_owned()),
            ("LMFORGE_JOBS_SUBJECT_PREFIX", stack.jobs_queue.0.clone()),
            ("LMFORGE_JOBS_STREAM", stack.jobs_queue.1.clone()),
            ("LMFORGE_TRAINER_LISTEN", "127.0.0.1:0".to_owned()),
            ("LMFORGE_TRAINER_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
            ("LMFORGE_LOG", "warn".to_owned()),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.to_owned()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map(Trainer)
        .expect("spawn lmforge-trainer")
}

/// Polls the collector until `check` finds what it needs in the spans of `trace_id`.
async fn wait_for_trace(
    collector: &OtlpCollector,
    what: &str,
    trace_id: impl Fn() -> Option<String>,
    check: impl Fn(&[(String, Span)]) -> bool,
) -> Vec<(String, Span)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(id) = trace_id() {
            let spans = collector.trace(&id);
            if check(&spans) {
                return spans;
            }
            if Instant::now() > deadline {
                let names: Vec<String> = spans
                    .iter()
                    .map(|(service, span)| format!("{service}: {}", span.name))
                    .collect();
                panic!("{what}: trace {id} is incomplete: {names:#?}");
            }
        } else if Instant::now() > deadline {
            panic!(
                "{what}: no such trace was exported; received: {:#?}",
                collector.summary()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every service's admin port serves Prometheus text with that service's own RPC counters
/// (in-process services share one registry, so each must appear under its `server` label).
async fn assert_every_service_counts_its_rpcs(stack: &Stack) {
    for service in &stack.services {
        let (code, metrics) = lmforge::probe::admin_get(service.admin, "/metrics")
            .await
            .unwrap_or_else(|e| panic!("{}: /metrics: {e}", service.name));
        assert_eq!(code, 200, "{}", service.name);
        let own = format!("server=\"{}\"", service.name);
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("grpc_server_handled_total") && l.contains(&own)),
            "{} has no RPC counters of its own",
            service.name
        );
    }
}

fn has(spans: &[(String, Span)], service: Option<&str>, name: &str, kind: Option<i32>) -> bool {
    spans.iter().any(|(s, span)| {
        span.name == name
            && service.is_none_or(|want| s == want)
            && kind.is_none_or(|k| span.kind == k)
    })
}

/// A healthy stack on `prefix`'s schemas with an admin key and an artifacts directory,
/// `adjust`ed; returns it with the directory (kept alive) and the admin key.
async fn journey_stack(
    prefix: &str,
    adjust: impl FnOnce(StackOptions) -> StackOptions,
) -> (Stack, tempfile::TempDir, String) {
    let artifacts = tempfile::tempdir().expect("temp dir");
    let admin_key = format!("lmf_admin_{prefix}");
    let mut stack = Stack::start(adjust(StackOptions {
        gateway_admin_key: Some(admin_key.clone()),
        artifacts: Some(artifacts.path().display().to_string()),
        ..stack_options(prefix)
    }))
    .await
    .expect("every port binds");
    stack
        .wait_healthy(Duration::from_secs(60))
        .await
        .expect("every service SERVING (run `make services` if Postgres/NATS are down)");
    (stack, artifacts, admin_key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_journey_survives_a_killed_trainer_and_is_traced_end_to_end() {
    let collector = OtlpCollector::start().await;
    let mut telemetry = lmforge_telemetry::TelemetryConfig::from_env("lmforge-e2e").expect("env");
    telemetry.otlp_endpoint = Some(collector.endpoint.clone());
    telemetry.export_delay = Duration::from_millis(100);
    let telemetry = lmforge_telemetry::init_with(telemetry).expect("first init in this process");

    let prefix = lmforge_e2e::unique_name("journey");
    let (stack, artifacts, admin_key) = journey_stack(&prefix, |o| StackOptions {
        trainer: false,
        jobs_ack_wait: Some(Duration::from_secs(3)),
        ..o
    })
    .await;
    let mut victim = spawn_trainer(&stack, "victim", artifacts.path(), &collector.endpoint);

    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bank-adviser");
    let mut options = JourneyOptions::tiny(examples, admin_key, "bank".to_owned());
    // Long enough to kill the worker between its first checkpoint and the end.
    options.finetune_steps = 200;
    let mut journey = Journey::connect(Endpoints::of(&stack).expect("endpoints"), options)
        .await
        .expect("clients");

    // Upload: the dirt in the bundled file is reported and the rest kept.
    let (dataset, report) = journey.upload_dataset().await.expect("upload");
    assert_eq!(report.parse_error_count, 2, "two lines are not JSON");
    let removed = |rule: &str| {
        report
            .rules
            .iter()
            .find(|r| r.rule == rule)
            .map_or(0, |r| r.removed)
    };
    let changed = |rule: &str| {
        report
            .rules
            .iter()
            .find(|r| r.rule == rule)
            .map_or(0, |r| r.changed)
    };
    assert!(removed("dedup.exact") >= 3, "{:?}", report.rules);
    assert_eq!(removed("blocklist"), 2, "{:?}", report.rules);
    assert!(
        removed("filter.incomplete_dialogue") >= 2,
        "{:?}",
        report.rules
    );
    for pii in [
        "pii.email",
        "pii.phone",
        "pii.cn_resident_id",
        "pii.bank_card",
    ] {
        assert!(
            changed(pii) >= 1,
            "{pii} redacted nothing: {:?}",
            report.rules
        );
    }
    assert!(report.output_records >= 30, "{}", report.output_records);

    // A base model trained from scratch, with its own tokenizer, by the worker process.
    let base = journey.base_model().await.expect("from-scratch base");
    assert!(
        base.files.iter().any(|f| f.path == "tokenizer.json"),
        "the trained tokenizer is part of the base version"
    );

    // Fine-tuning; the worker running it is killed after its first checkpoint.
    let job = journey
        .submit_finetune(&base, &dataset)
        .await
        .expect("submit");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let current = journey.job(&job.id).await.expect("get job");
        if current.checkpoint_count >= 1 {
            break;
        }
        assert_ne!(
            current.state,
            pb::JobState::Succeeded as i32,
            "finished before the kill; make it longer"
        );
        assert!(
            Instant::now() < deadline,
            "no checkpoint: {:?}",
            current.failure
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    victim.kill();
    let rescuer = spawn_trainer(&stack, "rescuer", artifacts.path(), &collector.endpoint);
    let job = journey
        .follow(&job.id)
        .await
        .expect("the job still finishes");
    assert!(job.attempt >= 2, "redelivered after the kill");
    assert_eq!(job.worker_id, "rescuer");
    let mut jobs = lmforge::job_cmd::connect(&format!(
        "http://{}",
        stack.service("jobs").expect("jobs").grpc
    ))
    .await
    .expect("jobs client");
    let logs = jobs
        .get_job_logs(pb::GetJobLogsRequest {
            id: job.id.clone(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("logs")
        .into_inner();
    assert!(
        logs.lines
            .iter()
            .any(|l| l.message.contains("resuming from the checkpoint")),
        "the rescuer resumed from the victim's checkpoint, not from step 0"
    );

    // The new version, its lineage, `production`, and answers through the gateway.
    let tuned = journey.promote(&job).await.expect("promote");
    let lineage = tuned.lineage.clone().expect("lineage");
    let trained_from = lineage.base_model_version.expect("base in the lineage");
    assert_eq!(
        (trained_from.name.as_str(), trained_from.version),
        (base.model_name.as_str(), base.version)
    );
    assert_eq!(lineage.dataset_version_id, dataset.id);
    assert_eq!(lineage.training_job_id, job.id);
    let answers = journey.compare(&base, &tuned).await.expect("answers");
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].after.model, "bank-adviser@production");

    // One trace per chat request: the gateway's HTTP span, its call, inference's server span.
    for answer in [&answers[0].before, &answers[0].after] {
        let trace_id = answer.trace_id.clone();
        wait_for_trace(
            &collector,
            "chat completion",
            || Some(trace_id.clone()),
            |spans| {
                has(spans, None, "POST /v1/chat/completions", Some(SERVER))
                    && has(
                        spans,
                        None,
                        "lmforge.v1.InferenceService/Generate",
                        Some(SERVER),
                    )
            },
        )
        .await;
    }

    // One trace per training job: SubmitJob → (NATS) → the rescuer's `trainer.job`, its
    // reports back to jobs and the registration in the registry.
    let job_id = job.id.clone();
    let spans = wait_for_trace(
        &collector,
        "fine-tuning job",
        || {
            collector.trace_of(|service, span| {
                service == "trainer"
                    && span.name == "trainer.job"
                    && attribute(span, "job").as_deref() == Some(job_id.as_str())
            })
        },
        |spans| {
            has(spans, None, "lmforge.v1.JobService/SubmitJob", Some(SERVER))
                && has(spans, Some("trainer"), "trainer.job", None)
                && has(spans, None, "jobs.report", None)
                && has(
                    spans,
                    None,
                    "lmforge.v1.RegistryService/FinalizeModelVersion",
                    Some(SERVER),
                )
        },
    )
    .await;
    assert!(
        spans.iter().any(|(service, _)| service == "lmforge-e2e"),
        "the in-process services' spans are in the job's trace"
    );

    // Prometheus metrics on every service's admin port.
    assert_every_service_counts_its_rpcs(&stack).await;
    let gateway = stack.service("gateway").expect("gateway");
    let (_, metrics) = lmforge::probe::admin_get(gateway.admin, "/metrics")
        .await
        .expect("gateway metrics");
    assert!(
        metrics.contains("http_server_requests_total"),
        "the gateway counts HTTP requests"
    );

    drop(rescuer);
    stack.shutdown().await.expect("clean shutdown");
    drop_schemas(&prefix).await;
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
}

/// The other way in: a Hugging Face checkpoint directory (the committed tiny Llama fixture)
/// imported as the base, fine-tuned by the stack's own trainer, promoted and asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_journey_fine_tunes_an_imported_hugging_face_model() {
    let prefix = lmforge_e2e::unique_name("journey_hf");
    let (stack, _artifacts, admin_key) = journey_stack(&prefix, |o| o).await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut options = JourneyOptions::tiny(
        root.join("examples/bank-adviser"),
        admin_key,
        "hf".to_owned(),
    );
    options.base_model_dir = Some(root.join("libs/model/fixtures/tiny-llama"));
    options.finetune_steps = 6;
    let mut journey = Journey::connect(Endpoints::of(&stack).expect("endpoints"), options)
        .await
        .expect("clients");
    let report = Box::pin(journey.run()).await.expect("the journey");

    assert_eq!(report.base.model_name, "hf-base");
    let imported = report.base.lineage.clone().unwrap_or_default();
    assert!(imported.training_job_id.is_empty(), "an import, not a job");
    let lineage = report.tuned.lineage.clone().expect("lineage");
    assert_eq!(
        lineage.base_model_version.map(|b| (b.name, b.version)),
        Some((report.base.model_name.clone(), report.base.version))
    );
    assert_eq!(lineage.training_job_id, report.job.id);
    assert_eq!(report.job.attempt, 1);
    assert_eq!(report.answers.len(), 1);
    assert_eq!(
        report.answers[0].before.model,
        format!("hf-base/{}", report.base.version)
    );
    assert_eq!(report.answers[0].after.model, "hf-adviser@production");
    // `lmforge model unload|load` move models in and out of inference, as the README's
    // by-hand journey does.
    let inference_url = format!(
        "http://{}",
        stack.service("inference").expect("inference").grpc
    );
    let cli = |words: &[&str]| {
        let output = Command::new(binary("lmforge"))
            .args(words)
            .args(["--inference-url", &inference_url])
            .output()
            .expect("run lmforge");
        assert!(
            output.status.success(),
            "lmforge {words:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let mut inference =
        lmforge_proto::v1::inference_service_client::InferenceServiceClient::connect(
            inference_url.clone(),
        )
        .await
        .expect("inference client");
    let mut loaded = async || -> Vec<String> {
        inference
            .list_models(pb::ListLoadedModelsRequest::default())
            .await
            .expect("list models")
            .into_inner()
            .models
            .into_iter()
            .map(|m| m.model_ref)
            .collect()
    };
    assert!(loaded().await.contains(&"hf-adviser@production".to_owned()));
    assert!(cli(&["model", "unload", "hf-adviser@production"]).contains("unloaded"));
    assert!(!loaded().await.contains(&"hf-adviser@production".to_owned()));
    let said = cli(&["model", "load", "hf-adviser@production"]);
    assert!(said.contains("(hf-adviser/1)"), "{said}");
    assert!(loaded().await.contains(&"hf-adviser@production".to_owned()));

    // This stack runs its trainer in-process: its metrics too.
    assert!(stack.service("trainer").is_some());
    assert_every_service_counts_its_rpcs(&stack).await;

    stack.shutdown().await.expect("clean shutdown");
    drop_schemas(&prefix).await;
}
