//! Training jobs end to end: the jobs service on Postgres + JetStream, trainer workers pulling
//! from the queue, datasets from ingest and models from the registry, all real, with a tiny
//! model so that each job trains in well under a second.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::{JobsTuning, Stack, spec};
use futures::StreamExt;
use lmforge_proto::v1 as pb;
use pb::JobState;
use tonic::Code;

const MINUTE: Duration = Duration::from_secs(60);

fn field_of(status: &tonic::Status) -> String {
    status
        .message()
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_trains_registers_its_lineage_and_streams_progress() {
    let mut stack = Stack::start("jobs_ok", JobsTuning::default()).await;
    stack.import_base("base-tiny").await;
    let dataset = stack.upload_dataset("support", 60).await;
    let mut s = spec("base-tiny/1", &dataset, "support-tiny", 6);
    s.output_alias = "staging".into();
    s.client_request_id = "req-1".into();
    let job = stack.submit(s.clone()).await.expect("submit");
    assert_eq!(job.state, JobState::Queued as i32);
    // Defaults are filled in and echoed back.
    let h = job
        .spec
        .as_ref()
        .and_then(|s| s.hyperparameters)
        .expect("spec");
    assert_eq!(h.gradient_accumulation_steps, Some(1));
    assert_eq!(h.schedule, pb::LrSchedule::Cosine as i32);
    // Idempotent on the client request id; a different spec under it is refused.
    let again = stack.submit(s.clone()).await.expect("retry");
    assert_eq!(again.id, job.id);
    let mut other = s.clone();
    other.priority = 5;
    assert_eq!(
        stack.submit(other).await.expect_err("reused id").code(),
        Code::AlreadyExists
    );

    let mut watch = stack
        .jobs
        .watch_job(pb::WatchJobRequest {
            id: job.id.clone(),
            include_logs: true,
            after_sequence: 0,
        })
        .await
        .expect("watch")
        .into_inner();
    // The worker starts once the watch is in place, so the watch sees every state change.
    stack.start_worker("w1").await;
    let mut kinds = Vec::new();
    let mut states = Vec::new();
    let mut steps = Vec::new();
    let mut finished = None;
    let collect = async {
        while let Some(event) = watch.next().await {
            match event.expect("event").event.expect("payload") {
                pb::job_event::Event::Snapshot(_) => kinds.push("snapshot"),
                pb::job_event::Event::StateChange(c) => {
                    kinds.push("state");
                    states.push(c.to);
                }
                pb::job_event::Event::Progress(p) => {
                    kinds.push("progress");
                    steps.push(p.step);
                }
                pb::job_event::Event::Checkpoint(_) => kinds.push("checkpoint"),
                pb::job_event::Event::Log(_) => kinds.push("log"),
                pb::job_event::Event::Finished(job) => {
                    finished = Some(job);
                    break;
                }
            }
        }
    };
    tokio::time::timeout(MINUTE, collect)
        .await
        .expect("the job finishes");
    let done = finished.expect("a finished event ends the stream");
    assert_eq!(done.state, JobState::Succeeded as i32, "{:?}", done.failure);
    assert_eq!(kinds[0], "snapshot");
    assert!(states.contains(&(JobState::Running as i32)));
    assert_eq!(states.last(), Some(&(JobState::Succeeded as i32)));
    assert!(kinds.contains(&"checkpoint") && kinds.contains(&"log"));
    assert_eq!(
        steps.last(),
        Some(&6),
        "progress reaches the last step: {steps:?}"
    );
    assert_eq!(done.attempt, 1);
    assert!(done.checkpoint_count >= 2);
    assert!(
        done.result_metrics.contains_key("eval_loss"),
        "{:?}",
        done.result_metrics
    );

    // The registered version carries the full lineage.
    let result = done.result_model_version.clone().expect("result version");
    let version = stack
        .registry
        .get_model_version(pb::GetModelVersionRequest {
            model_name: result.name.clone(),
            version: result.version,
        })
        .await
        .expect("registered")
        .into_inner();
    let lineage = version.lineage.expect("lineage");
    assert_eq!(lineage.training_job_id, job.id);
    assert_eq!(lineage.dataset_version_id, done.resolved_dataset_version_id);
    let base = lineage.base_model_version.expect("base");
    assert_eq!((base.name.as_str(), base.version), ("base-tiny", 1));
    assert!(version.metrics.contains_key("eval_loss"));
    let hp = version.hyperparameters.expect("hyperparameters");
    assert!(hp.fields.contains_key("learning_rate"));
    // A new alias moves to the first result.
    let staged = stack
        .registry
        .resolve_model_ref(pb::ResolveModelRefRequest {
            model_ref: "support-tiny@staging".into(),
        })
        .await
        .expect("alias")
        .into_inner();
    assert_eq!(staged.version.expect("v").version, result.version);

    // Incremental fine-tuning: start from the version just trained.
    let job2 = stack
        .submit(spec("support-tiny@staging", &dataset, "support-tiny", 2))
        .await
        .expect("submit from the trained version");
    let job2 = stack
        .wait_for(&job2.id, &[JobState::Succeeded, JobState::Failed], MINUTE)
        .await;
    assert_eq!(job2.state, JobState::Succeeded as i32, "{:?}", job2.failure);
    assert_eq!(
        job2.resolved_base_model.expect("base").version,
        result.version
    );

    let logs = stack
        .jobs
        .get_job_logs(pb::GetJobLogsRequest {
            id: job.id.clone(),
            ..Default::default()
        })
        .await
        .expect("logs")
        .into_inner();
    assert!(
        logs.lines.iter().any(|l| !l.worker_id.is_empty()),
        "worker lines are kept"
    );
    let checkpoints = stack
        .jobs
        .list_job_checkpoints(pb::ListJobCheckpointsRequest {
            id: job.id.clone(),
            ..Default::default()
        })
        .await
        .expect("checkpoints")
        .into_inner()
        .checkpoints;
    assert!(
        checkpoints.windows(2).all(|w| w[0].step > w[1].step),
        "newest first"
    );
    assert!(checkpoints.iter().all(|c| c.manifest_sha256.len() == 64));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_specs_are_refused_naming_their_field() {
    let mut stack = Stack::start("jobs_bad", JobsTuning::default()).await;
    stack.import_base("base-tiny").await;
    let dataset = stack.upload_dataset("support", 20).await;
    let good = spec("base-tiny/1", &dataset, "out", 2);
    let with_hp = |f: &dyn Fn(&mut pb::Hyperparameters)| {
        let mut s = good.clone();
        f(s.hyperparameters.as_mut().expect("hp"));
        s
    };
    let cases: Vec<(pb::JobSpec, Code, &str)> = vec![
        (
            with_hp(&|h| h.learning_rate = Some(0.0)),
            Code::InvalidArgument,
            "spec.hyperparameters.learning_rate",
        ),
        (
            with_hp(&|h| h.learning_rate = Some(-1.0)),
            Code::InvalidArgument,
            "spec.hyperparameters.learning_rate",
        ),
        (
            with_hp(&|h| h.batch_size = Some(0)),
            Code::InvalidArgument,
            "spec.hyperparameters.batch_size",
        ),
        (
            with_hp(&|h| h.max_seq_len = Some(4096)),
            Code::InvalidArgument,
            "spec.hyperparameters.max_seq_len",
        ),
        (
            pb::JobSpec {
                dataset_version: "nope/9".into(),
                ..good.clone()
            },
            Code::NotFound,
            "spec.dataset_version",
        ),
        (
            pb::JobSpec {
                base: Some(pb::job_spec::Base::BaseModel("ghost/1".into())),
                ..good.clone()
            },
            Code::NotFound,
            "spec.base_model",
        ),
        (
            pb::JobSpec {
                base: None,
                ..good.clone()
            },
            Code::InvalidArgument,
            "spec.base",
        ),
        (
            pb::JobSpec {
                output_model_name: String::new(),
                ..good.clone()
            },
            Code::InvalidArgument,
            "spec.output_model_name",
        ),
        (
            pb::JobSpec {
                output_alias: "latest".into(),
                ..good.clone()
            },
            Code::InvalidArgument,
            "spec.output_alias",
        ),
        (
            pb::JobSpec {
                priority: -101,
                ..good.clone()
            },
            Code::InvalidArgument,
            "spec.priority",
        ),
        (
            pb::JobSpec {
                method: Some(pb::job_spec::Method::Lora(pb::LoraConfig {
                    rank: Some(0),
                    ..Default::default()
                })),
                ..good.clone()
            },
            Code::InvalidArgument,
            "spec.lora.rank",
        ),
    ];
    for (s, code, field) in cases {
        let error = stack.submit(s).await.expect_err(field);
        assert_eq!(
            (error.code(), field_of(&error).as_str()),
            (code, field),
            "{}",
            error.message()
        );
    }
    let missing = stack
        .jobs
        .submit_job(pb::SubmitJobRequest { spec: None })
        .await
        .expect_err("no spec");
    assert_eq!(field_of(&missing), "spec");
    for bad in ["", "not-a-uuid"] {
        let error = stack
            .jobs
            .get_job(pb::GetJobRequest { id: bad.into() })
            .await
            .expect_err("bad id");
        assert_eq!(
            (error.code(), field_of(&error).as_str()),
            (Code::InvalidArgument, "id")
        );
    }
    let unknown = stack
        .jobs
        .cancel_job(pb::CancelJobRequest {
            id: uuid::Uuid::new_v4().to_string(),
            reason: String::new(),
        })
        .await
        .expect_err("unknown job");
    assert_eq!(unknown.code(), Code::NotFound);
    // Nothing was stored for the refused specs.
    let listed = stack
        .jobs
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("list")
        .into_inner();
    assert!(listed.jobs.is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_while_queued_and_while_running() {
    let mut stack = Stack::start("jobs_cancel", JobsTuning::default()).await;
    stack.import_base("base-tiny").await;
    let dataset = stack.upload_dataset("support", 40).await;
    // No worker yet: the job waits in the queue and is cancelled at once.
    let queued = stack
        .submit(spec("base-tiny/1", &dataset, "out", 2))
        .await
        .expect("submit");
    let cancelled = stack
        .jobs
        .cancel_job(pb::CancelJobRequest {
            id: queued.id.clone(),
            reason: "changed my mind".into(),
        })
        .await
        .expect("cancel")
        .into_inner();
    assert_eq!(cancelled.state, JobState::Cancelled as i32);
    let again = stack
        .jobs
        .cancel_job(pb::CancelJobRequest {
            id: queued.id.clone(),
            reason: String::new(),
        })
        .await
        .expect_err("already terminal");
    assert_eq!(again.code(), Code::FailedPrecondition);

    // A long job: cancelled while running, the worker stops at its next step.
    stack.start_worker("w1").await;
    let long = stack
        .submit(spec("base-tiny/1", &dataset, "out", 100_000))
        .await
        .expect("submit");
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        let job = stack.get(&long.id).await;
        if job.latest_progress.as_ref().is_some_and(|p| p.step >= 2) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requested = stack
        .jobs
        .cancel_job(pb::CancelJobRequest {
            id: long.id.clone(),
            reason: String::new(),
        })
        .await
        .expect("cancel running")
        .into_inner();
    assert!(requested.cancel_requested);
    let done = stack
        .wait_for(
            &long.id,
            &[JobState::Cancelled, JobState::Failed, JobState::Succeeded],
            MINUTE,
        )
        .await;
    assert_eq!(done.state, JobState::Cancelled as i32, "{:?}", done.failure);
    assert!(done.latest_progress.expect("progress").step < 100_000);
    // The queued job never ran, even with a worker present (its message was withdrawn).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stack.get(&queued.id).await.attempt, 0);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_exhausts_max_deliver_fails_with_the_reason() {
    let tuning = JobsTuning {
        ack_wait: Duration::from_millis(400),
        max_attempts: 2,
    };
    let mut stack = Stack::start("jobs_maxdel", tuning).await;
    stack.import_base("base-tiny").await;
    let dataset = stack.upload_dataset("support", 20).await;
    let job = stack
        .submit(spec("base-tiny/1", &dataset, "out", 2))
        .await
        .expect("submit");
    // A worker that takes the message and dies each time: never acks, never heartbeats.
    let client = async_nats::connect(common::nats_url()).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(&stack.stream).await.expect("stream");
    let consumer: async_nats::jetstream::consumer::PullConsumer = stream
        .get_consumer(&lmforge_jobs::queue::QueueNames::consumer_name(
            "any", "normal",
        ))
        .await
        .expect("consumer");
    // JetStream notices the exhausted message when a pull asks for it again (idle workers
    // keep pulling), so the fake worker keeps pulling until the job has failed.
    let mut deliveries = 0;
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        assert!(std::time::Instant::now() < deadline, "the job never failed");
        let mut batch = consumer
            .fetch()
            .max_messages(1)
            .expires(Duration::from_millis(300))
            .messages()
            .await
            .expect("fetch");
        if let Some(Ok(message)) = batch.next().await {
            assert_eq!(String::from_utf8_lossy(&message.payload), job.id);
            deliveries += 1;
        }
        if deliveries >= 2 && stack.get(&job.id).await.state == JobState::Failed as i32 {
            break;
        }
    }
    assert_eq!(deliveries, 2, "max_deliver bounds the deliveries");
    let failed = stack.wait_for(&job.id, &[JobState::Failed], MINUTE).await;
    let failure = failed.failure.expect("failure");
    assert_eq!(failure.code, "MAX_ATTEMPTS_EXCEEDED");
    assert!(
        failure.message.contains("2 deliveries"),
        "{}",
        failure.message
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_jobs_across_three_workers_each_run_exactly_once() {
    let mut stack = Stack::start("jobs_many", JobsTuning::default()).await;
    stack.import_base("base-tiny").await;
    let dataset = stack.upload_dataset("support", 12).await;
    for w in ["w1", "w2", "w3"] {
        stack.start_worker(w).await;
    }
    let mut ids = Vec::new();
    for i in 0..200 {
        let mut s = spec("base-tiny/1", &dataset, "many", 1);
        s.priority = [0, 10, -10][i % 3];
        if let Some(h) = s.hyperparameters.as_mut() {
            h.eval_every_steps = 0;
            h.checkpoint_every_steps = 0;
        }
        ids.push(stack.submit(s).await.expect("submit").id);
    }
    let mut workers = HashMap::<String, usize>::new();
    for id in &ids {
        let job = stack
            .wait_for(id, &[JobState::Succeeded, JobState::Failed], 5 * MINUTE)
            .await;
        assert_eq!(
            job.state,
            JobState::Succeeded as i32,
            "{id}: {:?}",
            job.failure
        );
        assert_eq!(job.attempt, 1, "{id} ran more than once");
        *workers.entry(job.worker_id.clone()).or_default() += 1;
    }
    assert_eq!(workers.len(), 3, "every worker took work: {workers:?}");
    // Exactly one registered version per job.
    let mut jobs_seen = HashSet::new();
    let mut page_token = String::new();
    loop {
        let page = stack
            .registry
            .list_model_versions(pb::ListModelVersionsRequest {
                model_name: "many".into(),
                page_size: 1000,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .expect("versions")
            .into_inner();
        for v in page.versions {
            let job_id = v.lineage.expect("lineage").training_job_id;
            assert!(jobs_seen.insert(job_id), "a job registered twice");
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(jobs_seen.len(), 200);
    stack.stop().await;
}

/// sha256 of the registered weights of a job's result.
async fn weights_sha(stack: &mut Stack, job: &pb::Job) -> String {
    let result = job.result_model_version.clone().expect("result");
    let version = stack
        .registry
        .get_model_version(pb::GetModelVersionRequest {
            model_name: result.name,
            version: result.version,
        })
        .await
        .expect("version")
        .into_inner();
    version
        .files
        .iter()
        .find(|f| f.path.ends_with(".safetensors"))
        .expect("weights")
        .sha256
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_job_is_resumed_to_the_same_weights() {
    let tuning = JobsTuning {
        ack_wait: Duration::from_secs(1),
        max_attempts: 3,
    };
    let mut stack = Stack::start("jobs_kill", tuning).await;
    stack.import_base("base-tiny").await;
    let dataset = stack.upload_dataset("support", 60).await;
    // Long enough that the run cannot finish between two polls after its second checkpoint.
    let steps = 100;
    let mut s = spec("base-tiny/1", &dataset, "resumed", steps);
    if let Some(h) = s.hyperparameters.as_mut() {
        h.eval_every_steps = 0;
        h.checkpoint_every_steps = 5;
    }
    // The run to compare with: uninterrupted, in-process.
    stack.start_worker("reference").await;
    let reference = stack.submit(s.clone()).await.expect("submit");
    let reference = stack
        .wait_for(
            &reference.id,
            &[JobState::Succeeded, JobState::Failed],
            2 * MINUTE,
        )
        .await;
    assert_eq!(
        reference.state,
        JobState::Succeeded as i32,
        "{:?}",
        reference.failure
    );
    stack.stop_workers().await;

    // The same job on a worker process, killed with SIGKILL after its second checkpoint.
    let cache = tempfile::tempdir().expect("dir");
    let (victim_env, rescuer_env) = (
        stack.trainer_env("victim", cache.path()),
        stack.trainer_env("rescuer", cache.path()),
    );
    let spawn = |env: &Vec<(String, String)>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_lmforge-trainer"));
        command.envs(env.iter().cloned());
        command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        command.spawn().expect("spawn lmforge-trainer")
    };
    let mut victim = spawn(&victim_env);
    let job = stack.submit(s.clone()).await.expect("submit");
    let deadline = std::time::Instant::now() + 2 * MINUTE;
    loop {
        let j = stack.get(&job.id).await;
        if j.checkpoint_count >= 2 {
            break;
        }
        assert!(
            j.state != JobState::Succeeded as i32,
            "finished before the kill; make it longer"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint: {:?}",
            j.failure
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    victim.kill().expect("SIGKILL");
    let _ = victim.wait();
    let mut rescuer = spawn(&rescuer_env);
    let done = stack
        .wait_for(
            &job.id,
            &[JobState::Succeeded, JobState::Failed],
            2 * MINUTE,
        )
        .await;
    let _ = rescuer.kill();
    let _ = rescuer.wait();
    assert_eq!(done.state, JobState::Succeeded as i32, "{:?}", done.failure);
    assert_eq!(done.attempt, 2, "redelivered once");
    assert_eq!(done.worker_id, "rescuer");
    let logs = stack
        .jobs
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
        "the second attempt resumed"
    );
    assert_eq!(
        weights_sha(&mut stack, &done).await,
        weights_sha(&mut stack, &reference).await,
        "resumed weights equal the uninterrupted run's"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn higher_priority_jobs_run_first() {
    let mut stack = Stack::start("jobs_prio", JobsTuning::default()).await;
    stack.import_base("base-tiny").await;
    let dataset = stack.upload_dataset("support", 12).await;
    // Queued while no worker runs, lowest priority first.
    let mut ids = Vec::new();
    for priority in [-50, 0, 50] {
        let mut s = spec("base-tiny/1", &dataset, "prio", 1);
        s.priority = priority;
        if let Some(h) = s.hyperparameters.as_mut() {
            h.eval_every_steps = 0;
            h.checkpoint_every_steps = 0;
        }
        ids.push(stack.submit(s).await.expect("submit").id);
    }
    stack.start_worker("w1").await;
    let mut started = Vec::new();
    for id in &ids {
        let job = stack
            .wait_for(id, &[JobState::Succeeded, JobState::Failed], MINUTE)
            .await;
        assert_eq!(job.state, JobState::Succeeded as i32, "{:?}", job.failure);
        let t = job.started_at.expect("started");
        started.push((t.seconds, t.nanos));
    }
    // One worker, one job at a time: high (50) before normal (0) before low (-50).
    assert!(
        started[2] < started[1] && started[1] < started[0],
        "start times by priority -50, 0, 50: {started:?}"
    );
    stack.stop().await;
}

/// `--stream-replicas` reaches JetStream: a replicated work queue is refused by the
/// single-server NATS of the tests, and the jobs service says so at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_replicas_reach_jetstream() {
    use clap::Parser;
    let base = common::unique("jobs_replicas");
    let mut config =
        lmforge_jobs::Config::try_parse_from(["lmforge-jobs", "--stream-replicas", "3"])
            .expect("flags");
    config.postgres.database_url = common::database_url();
    config.nats.nats_url = common::nats_url();
    config.schema = format!("{base}_jobs");
    config.subject_prefix = format!("{base}.jobs");
    config.stream = base.to_uppercase();
    let listeners = lmforge_runtime::Listeners::ephemeral().await.expect("bind");
    let served = tokio::time::timeout(
        Duration::from_secs(30),
        lmforge_jobs::serve(config, listeners, std::future::pending()),
    )
    .await
    .expect("start-up fails rather than serving");
    let error = served.expect_err("a single NATS server cannot hold 3 replicas");
    let message = error.to_string();
    assert!(
        message.contains("work queue") && message.to_lowercase().contains("replica"),
        "{message}"
    );
    assert!(
        lmforge_jobs::Config::try_parse_from(["lmforge-jobs", "--stream-replicas", "0"]).is_err(),
        "0 replicas is refused"
    );
    if let Ok(pool) = sqlx::PgPool::connect(&common::database_url()).await {
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{base}_jobs\" CASCADE"))
            .execute(&pool)
            .await;
    }
}
