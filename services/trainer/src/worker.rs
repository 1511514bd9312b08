//! The worker loop: take one job at a time from the work queue (highest priority band first),
//! heartbeat it while training (`in_progress` acks to JetStream, heartbeats to the jobs
//! service), report progress, checkpoints and the outcome, and settle the message:
//!
//! - success, a cancel, or a failure another attempt cannot fix → ack (the job is done);
//! - a failure another attempt might fix, or this worker shutting down → nak, so JetStream
//!   redelivers it and the next attempt resumes from the latest checkpoint;
//! - a crash → nothing: the heartbeats stop, `ack_wait` passes and JetStream redelivers, up to
//!   `max_deliver` times.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt;
use lmforge_jobs::queue::QueueNames;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::dataset_service_client::DatasetServiceClient;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use lmforge_store::ArtifactStore;
use lmforge_telemetry::propagation::TracedChannel;
use pb::worker_report::Report;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::run::{self, RunHooks, RunInputs, RunOutcome};
use crate::{checkpoints, inputs};

/// Checks a `--device` value: `cpu` or `cuda:N`.
pub fn parse_device(value: &str) -> Result<(), String> {
    match value {
        "cpu" => Ok(()),
        v if v
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok()) =>
        {
            if cfg!(feature = "cuda") {
                Ok(())
            } else {
                Err(format!("`{v}` needs a build with the `cuda` feature"))
            }
        }
        v => Err(format!("`{v}` is not a device (cpu, cuda:N)")),
    }
}

/// Opens the candle device for a `--device` value.
pub fn open_device(value: &str) -> Result<candle_core::Device, String> {
    parse_device(value)?;
    match value.strip_prefix("cuda:") {
        Some(n) => candle_core::Device::new_cuda(n.parse().expect("checked"))
            .map_err(|e| format!("cannot open {value}: {e}")),
        None => Ok(candle_core::Device::Cpu),
    }
}

/// Why a running job should stop (shared with the blocking training thread).
const RUNNING: u8 = 0;
const CANCEL: u8 = 1;
const RELEASE: u8 = 2;
const SUPERSEDED: u8 = 3;

/// Everything a worker needs; one job at a time.
pub struct Worker {
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub names: QueueNames,
    /// Traced: registration and downloads are part of the job's trace.
    pub registry: RegistryServiceClient<TracedChannel>,
    pub datasets: DatasetServiceClient<TracedChannel>,
    pub store: ArtifactStore,
    pub cache_dir: PathBuf,
    pub worker_id: String,
    pub device_name: String,
    pub device: candle_core::Device,
    pub progress_interval: Duration,
}

type PullConsumer = consumer::Consumer<consumer::pull::Config>;

impl Worker {
    /// The worker's consumers in the order it takes work from them, waiting for the jobs
    /// service to have created the stream.
    async fn consumers(
        &self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Option<(Vec<PullConsumer>, Duration)> {
        let mut logged = false;
        loop {
            match self.try_consumers().await {
                Ok(found) => return Some(found),
                Err(error) => {
                    if !logged {
                        tracing::info!(%error, stream = %self.names.stream, "waiting for the jobs service's work queue");
                        logged = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = shutdown.changed() => return None,
            }
        }
    }

    async fn try_consumers(&self) -> Result<(Vec<PullConsumer>, Duration), String> {
        let stream = self
            .js
            .get_stream(&self.names.stream)
            .await
            .map_err(|e| e.to_string())?;
        let mut consumers = Vec::new();
        let mut ack_wait = Duration::from_secs(30);
        for (device, band) in QueueNames::consumer_order(&self.device_name) {
            let mut consumer: PullConsumer = stream
                .get_consumer(&QueueNames::consumer_name(device, band))
                .await
                .map_err(|e| e.to_string())?;
            ack_wait = consumer
                .info()
                .await
                .map_err(|e| e.to_string())?
                .config
                .ack_wait;
            consumers.push(consumer);
        }
        Ok((consumers, ack_wait))
    }

    /// The next work message: the first consumer (highest band) that has one.
    async fn poll(&self, consumers: &[PullConsumer]) -> Option<jetstream::Message> {
        for consumer in consumers {
            let batch = consumer.fetch().max_messages(1).messages().await;
            match batch {
                Ok(mut batch) => {
                    if let Some(Ok(message)) = batch.next().await {
                        return Some(message);
                    }
                }
                Err(error) => tracing::debug!(%error, "fetch failed"),
            }
        }
        None
    }

    /// Runs jobs until `shutdown` turns true; a job in progress is given back (nak) after
    /// its current step.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some((consumers, ack_wait)) = self.consumers(&mut shutdown).await else {
            return;
        };
        let mut available = match self.nats.subscribe(self.names.available_subject()).await {
            Ok(s) => Some(s),
            Err(error) => {
                tracing::warn!(%error, "no wake-up subscription; polling only");
                None
            }
        };
        tracing::info!(worker = %self.worker_id, device = %self.device_name, "trainer worker ready");
        while !*shutdown.borrow() {
            if let Some(message) = self.poll(&consumers).await {
                self.clone()
                    .handle(message, ack_wait, shutdown.clone())
                    .await;
                continue;
            }
            let wake = async {
                match available.as_mut() {
                    Some(sub) => {
                        sub.next().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = wake => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Sends one report and waits for the jobs service's answer, retrying while it is
    /// unreachable (up to about a minute).
    async fn report(
        &self,
        job_id: &str,
        attempt: u32,
        report: Report,
    ) -> Result<pb::WorkerReply, String> {
        let payload = pb::WorkerReport {
            job_id: job_id.to_owned(),
            worker_id: self.worker_id.clone(),
            attempt,
            report: Some(report),
        }
        .encode_to_vec();
        let subject = self.names.report_subject(job_id);
        let mut delay = Duration::from_millis(100);
        let started = Instant::now();
        loop {
            let mut headers = async_nats::HeaderMap::new();
            lmforge_telemetry::propagation::inject_nats_headers(&mut headers);
            let answer = tokio::time::timeout(
                Duration::from_secs(10),
                self.nats
                    .request_with_headers(subject.clone(), headers, payload.clone().into()),
            )
            .await;
            let error = match answer {
                Ok(Ok(message)) => match pb::WorkerReply::decode(message.payload.as_ref()) {
                    Ok(reply) if reply.proceed || !reply.message.starts_with("error: ") => {
                        return Ok(reply);
                    }
                    Ok(reply) => reply.message,
                    Err(e) => e.to_string(),
                },
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer in 10s".to_owned(),
            };
            if started.elapsed() > Duration::from_secs(60) {
                return Err(format!("the jobs service did not take the report: {error}"));
            }
            tracing::debug!(%error, "report not taken; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn handle(
        self: Arc<Self>,
        message: jetstream::Message,
        ack_wait: Duration,
        shutdown: watch::Receiver<bool>,
    ) {
        let job_id = String::from_utf8_lossy(&message.payload).trim().to_owned();
        let (attempt, stream_sequence) = match message.info() {
            Ok(info) => (info.delivered.max(1) as u32, info.stream_sequence),
            Err(_) => (1, 0),
        };
        let span = tracing::info_span!("trainer.job", job = %job_id, attempt);
        let _ = span.set_parent(lmforge_telemetry::propagation::extract_nats_context(
            message.headers.as_ref(),
        ));
        let message = Arc::new(message);
        let settle = self
            .clone()
            .work(
                job_id.clone(),
                attempt,
                stream_sequence,
                message.clone(),
                ack_wait,
                shutdown,
            )
            .instrument(span)
            .await;
        let result = match settle {
            Settle::Ack => message.double_ack().await.map_err(|e| e.to_string()),
            Settle::Nak(delay) => message
                .ack_with(AckKind::Nak(delay))
                .await
                .map_err(|e| e.to_string()),
            Settle::Leave => Ok(()),
        };
        if let Err(error) = result {
            tracing::warn!(job = %job_id, %error, "could not settle the work message");
        }
    }

    async fn work(
        self: Arc<Self>,
        job_id: String,
        attempt: u32,
        stream_sequence: u64,
        message: Arc<jetstream::Message>,
        ack_wait: Duration,
        shutdown: watch::Receiver<bool>,
    ) -> Settle {
        // Keep the message alive from the first moment: downloads may take a while.
        let stop = Arc::new(AtomicU8::new(RUNNING));
        let started = Arc::new(AtomicBool::new(false));
        // Spawned tasks report in the job's trace too.
        let beat = tokio::spawn(
            heartbeat(
                self.clone(),
                job_id.clone(),
                attempt,
                message.clone(),
                (ack_wait / 3).max(Duration::from_millis(30)),
                stop.clone(),
                started.clone(),
            )
            .in_current_span(),
        );
        let settle = self
            .work_inner(job_id, attempt, stream_sequence, stop, started, shutdown)
            .await;
        beat.abort();
        settle
    }

    async fn work_inner(
        self: Arc<Self>,
        job_id: String,
        attempt: u32,
        stream_sequence: u64,
        stop: Arc<AtomicU8>,
        started: Arc<AtomicBool>,
        shutdown: watch::Receiver<bool>,
    ) -> Settle {
        let job_id = job_id.as_str();
        let reply = match self
            .report(
                job_id,
                attempt,
                Report::Started(pb::WorkerStarted {
                    device: self.device_name.clone(),
                    stream_sequence,
                }),
            )
            .await
        {
            Ok(reply) => reply,
            // The jobs service is down: give the job back for later.
            Err(error) => {
                tracing::warn!(job = %job_id, %error, "cannot start the job");
                return Settle::Nak(Some(RETRY_DELAY));
            }
        };
        if !reply.proceed {
            tracing::info!(job = %job_id, reason = %reply.message, "not running the job");
            return Settle::Ack;
        }
        let Some(job) = reply.job else {
            return Settle::Nak(Some(RETRY_DELAY));
        };
        started.store(true, Ordering::SeqCst);
        tracing::info!(job = %job_id, attempt, "job started");
        // Cancels arrive over NATS while training.
        let cancel_watch = match self.nats.subscribe(self.names.cancel_subject(job_id)).await {
            Ok(mut sub) => {
                let stop = stop.clone();
                Some(tokio::spawn(async move {
                    if sub.next().await.is_some() {
                        let _ = stop.compare_exchange(
                            RUNNING,
                            CANCEL,
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        );
                    }
                }))
            }
            Err(_) => None,
        };
        let shutdown_watch = {
            let stop = stop.clone();
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                while !*shutdown.borrow() {
                    if shutdown.changed().await.is_err() {
                        return;
                    }
                }
                let _ = stop.compare_exchange(RUNNING, RELEASE, Ordering::SeqCst, Ordering::SeqCst);
            })
        };
        let outcome = self
            .clone()
            .train(job.clone(), attempt, reply.resume_from, stop.clone())
            .await;
        if let Some(task) = cancel_watch {
            task.abort();
        }
        shutdown_watch.abort();
        self.finish(job_id.to_owned(), attempt, job, outcome, stop)
            .await
    }

    /// Prepares the inputs and runs training on a blocking thread.
    async fn train(
        self: Arc<Self>,
        job: pb::Job,
        attempt: u32,
        resume_from: Option<pb::JobCheckpoint>,
        stop: Arc<AtomicU8>,
    ) -> Result<Trained, Failure> {
        let job_id = job.id.clone();
        let spec = job.spec.clone().unwrap_or_default();
        let mut datasets = self.datasets.clone();
        let (train_path, eval_path) = inputs::dataset(
            &mut datasets,
            &self.cache_dir,
            &job.resolved_dataset_version_id,
        )
        .await
        .map_err(Failure::from)?;
        let mut registry = self.registry.clone();
        let base = inputs::base_model(&mut registry, &self.cache_dir, &job)
            .await
            .map_err(Failure::from)?;
        let work_dir = self
            .cache_dir
            .join("runs")
            .join(&job_id)
            .join(format!("attempt-{attempt}"));
        let _ = tokio::fs::remove_dir_all(&work_dir).await;
        tokio::fs::create_dir_all(&work_dir)
            .await
            .map_err(|e| Failure::internal(format!("work dir: {e}"), true))?;
        let resume = match &resume_from {
            Some(checkpoint) => {
                let dir = work_dir.join("resume");
                checkpoints::download(
                    self.store.clone(),
                    checkpoint.manifest_sha256.clone(),
                    dir.clone(),
                )
                .await
                .map_err(|e| Failure::internal(format!("fetching checkpoint: {e}"), true))?;
                self.log(
                    &job_id,
                    attempt,
                    pb::LogLevel::Info,
                    format!("resuming from the checkpoint of step {}", checkpoint.step),
                )
                .await;
                Some(dir)
            }
            None => None,
        };
        let inputs = RunInputs {
            job_id: job_id.clone(),
            attempt,
            spec,
            base,
            train_path,
            eval_path,
            work_dir,
            resume_from: resume,
            device: self.device.clone(),
        };
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let reporter = tokio::spawn(
            reporter(
                self.clone(),
                job_id.clone(),
                attempt,
                events_rx,
                stop.clone(),
            )
            .in_current_span(),
        );
        let mut hooks = Hooks {
            worker: self.clone(),
            runtime: tokio::runtime::Handle::current(),
            job_id: job_id.clone(),
            attempt,
            events: events_tx,
            stop: stop.clone(),
            last_progress: None,
            interval: self.progress_interval,
            span: tracing::Span::current(),
        };
        let result = tokio::task::spawn_blocking(move || {
            let outcome = run::run(inputs, &mut hooks);
            drop(hooks);
            outcome
        })
        .await;
        // All progress and log lines are in before the outcome is reported.
        let _ = reporter.await;
        match result {
            Ok(Ok(outcome)) => Ok(Trained(outcome)),
            Ok(Err(error)) => Err(Failure {
                code: error.code(),
                message: error.to_string(),
                retryable: error.retryable(),
            }),
            Err(join) => Err(Failure::internal(
                format!("training panicked: {join}"),
                false,
            )),
        }
    }

    async fn log(&self, job_id: &str, attempt: u32, level: pb::LogLevel, message: String) {
        let line = log_line(&self.worker_id, attempt, level, message);
        let _ = self
            .report(
                job_id,
                attempt,
                Report::Logs(pb::WorkerLogs { lines: vec![line] }),
            )
            .await;
    }

    /// Registers a finished run and reports the outcome; decides how to settle the message.
    async fn finish(
        self: Arc<Self>,
        job_id: String,
        attempt: u32,
        job: pb::Job,
        outcome: Result<Trained, Failure>,
        stop: Arc<AtomicU8>,
    ) -> Settle {
        let job_id = job_id.as_str();
        let report = match outcome {
            Ok(Trained(RunOutcome::Cancelled { step })) => match stop.load(Ordering::SeqCst) {
                RELEASE => Report::Released(pb::WorkerReleased {
                    reason: format!("worker shutting down at step {step}"),
                }),
                // Another delivery of the message holds the job now: leave the message to it.
                SUPERSEDED => return Settle::Leave,
                _ => Report::Cancelled(pb::WorkerCancelled { step }),
            },
            Ok(Trained(RunOutcome::Completed(result))) => {
                match crate::register::register(&self, &job, &result).await {
                    Ok(done) => Report::Succeeded(done),
                    Err(failure) => Report::Failed(failure.into_report()),
                }
            }
            Err(failure) => {
                tracing::warn!(job = %job_id, code = failure.code, message = %failure.message, "attempt failed");
                Report::Failed(failure.into_report())
            }
        };
        let retry = match &report {
            Report::Failed(f) if f.retryable => Some(RETRY_DELAY),
            Report::Released(_) => Some(Duration::ZERO),
            _ => None,
        };
        match self.report(job_id, attempt, report).await {
            Ok(_) => match retry {
                Some(delay) if delay.is_zero() => Settle::Nak(None),
                Some(delay) => Settle::Nak(Some(delay)),
                None => Settle::Ack,
            },
            // The outcome is not recorded: let the message come back (the registration is
            // idempotent on the job id, so a retry registers nothing twice).
            Err(error) => {
                tracing::warn!(job = %job_id, %error, "outcome not reported");
                Settle::Nak(Some(RETRY_DELAY))
            }
        }
    }
}

/// What to do with the work message once the attempt ends.
enum Settle {
    /// Done with the job: remove the message.
    Ack,
    /// Redeliver it (after the delay).
    Nak(Option<Duration>),
    /// Neither: another delivery of it is in charge.
    Leave,
}

/// Before a retryable failure is retried.
const RETRY_DELAY: Duration = Duration::from_secs(2);

struct Trained(RunOutcome);

/// A failed attempt, as reported.
#[derive(Debug)]
pub struct Failure {
    pub code: &'static str,
    pub message: String,
    pub retryable: bool,
}

impl Failure {
    pub fn internal(message: String, retryable: bool) -> Self {
        Failure {
            code: "INTERNAL",
            message,
            retryable,
        }
    }

    fn into_report(self) -> pb::WorkerFailed {
        pb::WorkerFailed {
            failure: Some(pb::Failure {
                code: self.code.to_owned(),
                message: self.message,
                details: HashMap::new(),
            }),
            retryable: self.retryable,
        }
    }
}

impl From<inputs::InputError> for Failure {
    fn from(e: inputs::InputError) -> Self {
        Failure {
            code: e.code,
            message: e.message,
            retryable: e.retryable,
        }
    }
}

fn log_line(worker_id: &str, attempt: u32, level: pb::LogLevel, message: String) -> pb::JobLogLine {
    pb::JobLogLine {
        sequence: 0,
        time: Some(now()),
        level: level as i32,
        message,
        attempt,
        worker_id: worker_id.to_owned(),
    }
}

/// Stops the run when the jobs service says so: a cancel request, or another delivery of the
/// job's message now holding it.
fn heed(reply: &pb::WorkerReply, stop: &AtomicU8) {
    if !reply.proceed {
        let code = if reply.message == "cancel requested" {
            CANCEL
        } else {
            SUPERSEDED
        };
        let _ = stop.compare_exchange(RUNNING, code, Ordering::SeqCst, Ordering::SeqCst);
    }
}

fn now() -> prost_types::Timestamp {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    prost_types::Timestamp {
        seconds: now.as_secs() as i64,
        nanos: now.subsec_nanos() as i32,
    }
}

/// Keeps the work message alive and tells the jobs service the worker is alive.
async fn heartbeat(
    worker: Arc<Worker>,
    job_id: String,
    attempt: u32,
    message: Arc<jetstream::Message>,
    every: Duration,
    stop: Arc<AtomicU8>,
    started: Arc<AtomicBool>,
) {
    loop {
        tokio::time::sleep(every).await;
        if let Err(error) = message.ack_with(AckKind::Progress).await {
            tracing::debug!(%error, "in_progress ack failed");
        }
        // Before the job is RUNNING the jobs service would refuse a heartbeat.
        if !started.load(Ordering::SeqCst) {
            continue;
        }
        let sent = worker
            .report(&job_id, attempt, Report::Heartbeat(pb::WorkerHeartbeat {}))
            .await;
        if let Ok(reply) = sent {
            heed(&reply, &stop);
        }
    }
}

enum Event {
    Progress(pb::JobProgress),
    Log(pb::JobLogLine),
}

/// Forwards progress and logs from the training thread to the jobs service, in order.
async fn reporter(
    worker: Arc<Worker>,
    job_id: String,
    attempt: u32,
    mut events: mpsc::UnboundedReceiver<Event>,
    stop: Arc<AtomicU8>,
) {
    while let Some(event) = events.recv().await {
        let report = match event {
            Event::Progress(p) => Report::Progress(p),
            Event::Log(line) => {
                let mut lines = vec![line];
                while let Ok(Event::Log(more)) = events.try_recv() {
                    lines.push(more);
                }
                Report::Logs(pb::WorkerLogs { lines })
            }
        };
        if let Ok(reply) = worker.report(&job_id, attempt, report).await {
            heed(&reply, &stop);
        }
    }
}

/// The training thread's view of the worker.
struct Hooks {
    worker: Arc<Worker>,
    runtime: tokio::runtime::Handle,
    job_id: String,
    attempt: u32,
    events: mpsc::UnboundedSender<Event>,
    stop: Arc<AtomicU8>,
    last_progress: Option<Instant>,
    interval: Duration,
    /// The job's span, for the reports sent from the training thread.
    span: tracing::Span,
}

impl RunHooks for Hooks {
    fn progress(&mut self, p: &run::Progress) {
        let due = self
            .last_progress
            .is_none_or(|t| t.elapsed() >= self.interval)
            || p.eval_loss.is_some()
            || p.step >= p.total_steps;
        if !due {
            return;
        }
        self.last_progress = Some(Instant::now());
        let _ = self.events.send(Event::Progress(pb::JobProgress {
            step: p.step,
            total_steps: p.total_steps,
            epoch: p.epoch,
            loss: p.loss,
            learning_rate: p.learning_rate,
            tokens_per_second: p.tokens_per_second,
            eval_loss: p.eval_loss,
            eta: p.eta.map(|d| prost_types::Duration {
                seconds: d.as_secs() as i64,
                nanos: d.subsec_nanos() as i32,
            }),
            grad_norm: p.grad_norm,
            trained_tokens: p.trained_tokens,
            attempt: self.attempt,
            time: Some(now()),
        }));
    }

    fn checkpoint(
        &mut self,
        dir: &std::path::Path,
        info: &run::CheckpointInfo,
    ) -> anyhow::Result<()> {
        let worker = self.worker.clone();
        let (job_id, attempt) = (self.job_id.clone(), self.attempt);
        let dir = dir.to_path_buf();
        let info = (info.step, info.epoch, info.loss, info.eval_loss, info.best);
        let span = self.span.clone();
        self.runtime.block_on(
            async move {
                let stored = checkpoints::upload(&worker.store, &dir).await?;
                let (step, epoch, loss, eval_loss, best) = info;
                let checkpoint = pb::JobCheckpoint {
                    job_id: job_id.clone(),
                    step,
                    epoch,
                    attempt,
                    uri: stored.uri,
                    size_bytes: stored.size_bytes,
                    manifest_sha256: stored.manifest_sha256,
                    loss,
                    eval_loss,
                    best,
                    created_at: Some(now()),
                };
                worker
                    .report(&job_id, attempt, Report::Checkpoint(checkpoint))
                    .await
                    .map_err(anyhow::Error::msg)?;
                Ok(())
            }
            .instrument(span),
        )
    }

    fn log(&mut self, level: pb::LogLevel, message: String) {
        let _ = self.events.send(Event::Log(log_line(
            &self.worker.worker_id,
            self.attempt,
            level,
            message,
        )));
    }

    fn cancelled(&self) -> bool {
        self.stop.load(Ordering::SeqCst) != RUNNING
    }
}
