//! An in-process lmforge stack for job tests: registry, ingest and jobs services on ephemeral
//! ports over real Postgres (a schema each) and NATS JetStream (a stream and subject prefix
//! per test), plus trainer workers in-process or as `lmforge-trainer` processes.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::dataset_service_client::DatasetServiceClient;
use lmforge_proto::v1::job_service_client::JobServiceClient;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use lmforge_runtime::Listeners;
use tonic::transport::{Channel, Endpoint};

pub fn database_url() -> String {
    std::env::var("LMFORGE_DATABASE_URL")
        .unwrap_or_else(|_| lmforge_runtime::args::DEFAULT_DATABASE_URL.to_owned())
}

pub fn nats_url() -> String {
    std::env::var("LMFORGE_NATS_URL")
        .unwrap_or_else(|_| lmforge_runtime::args::DEFAULT_NATS_URL.to_owned())
}

pub fn unique(label: &str) -> String {
    format!(
        "t_{label}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../libs/model/fixtures")
        .join(name)
}

/// Retries `probe` until it answers (a service that is still starting).
pub async fn wait_ready<F, Fut, T>(mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match probe().await {
            Ok(_) => return,
            Err(s) if s.code() != tonic::Code::Unavailable && s.code() != tonic::Code::Unknown => {
                return;
            }
            Err(s) => {
                assert!(Instant::now() < deadline, "service never came up: {s}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn channel(addr: std::net::SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect_lazy()
}

type Stop = tokio::sync::oneshot::Sender<()>;

/// Knobs of the jobs service under test.
#[derive(Debug, Clone, Copy)]
pub struct JobsTuning {
    pub ack_wait: Duration,
    pub max_attempts: u32,
}

impl Default for JobsTuning {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(2),
            max_attempts: 3,
        }
    }
}

pub struct Stack {
    pub label: String,
    pub schemas: Vec<String>,
    pub prefix: String,
    pub stream: String,
    pub artifacts: tempfile::TempDir,
    pub registry_url: String,
    pub ingest_url: String,
    pub jobs_url: String,
    pub jobs: JobServiceClient<Channel>,
    pub registry: RegistryServiceClient<Channel>,
    pub datasets: DatasetServiceClient<Channel>,
    stops: Vec<Stop>,
    workers: Vec<Stop>,
    pub dirs: Vec<tempfile::TempDir>,
}

impl Stack {
    pub async fn start(label: &str, tuning: JobsTuning) -> Stack {
        let base = unique(label);
        let artifacts = tempfile::tempdir().expect("temp dir");
        let mut stops = Vec::new();

        let mut rc =
            lmforge_registry::Config::try_parse_from(["lmforge-registry"]).expect("defaults");
        rc.postgres.database_url = database_url();
        rc.schema = format!("{base}_reg");
        rc.artifacts = artifacts.path().display().to_string();
        let rl = Listeners::ephemeral().await.expect("bind");
        let registry_addr = rl.grpc_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            if let Err(e) = lmforge_registry::serve(rc, rl, async {
                let _ = rx.await;
            })
            .await
            {
                eprintln!("registry: {e}");
            }
        });
        stops.push(tx);
        let registry = RegistryServiceClient::new(channel(registry_addr));
        wait_ready(|| {
            let mut c = registry.clone();
            async move {
                c.get_model(pb::GetModelRequest {
                    name: "probe".into(),
                })
                .await
            }
        })
        .await;

        let mut ic = lmforge_ingest::Config::try_parse_from(["lmforge-ingest"]).expect("defaults");
        ic.postgres.database_url = database_url();
        ic.schema = format!("{base}_ing");
        ic.artifacts = artifacts.path().display().to_string();
        ic.work_dir = artifacts.path().join("ingest-work").display().to_string();
        ic.registry_url = format!("http://{registry_addr}").parse().expect("url");
        ic.inference_url = "http://127.0.0.1:9".parse().expect("url");
        let il = Listeners::ephemeral().await.expect("bind");
        let ingest_addr = il.grpc_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            if let Err(e) = lmforge_ingest::serve(ic, il, async {
                let _ = rx.await;
            })
            .await
            {
                eprintln!("ingest: {e}");
            }
        });
        stops.push(tx);
        let datasets = DatasetServiceClient::new(channel(ingest_addr));
        wait_ready(|| {
            let mut c = datasets.clone();
            async move {
                c.get_dataset(pb::GetDatasetRequest {
                    name: "probe".into(),
                })
                .await
            }
        })
        .await;

        let prefix = format!("{base}.jobs");
        let stream = base.to_uppercase();
        let mut jc = lmforge_jobs::Config::try_parse_from(["lmforge-jobs"]).expect("defaults");
        jc.postgres.database_url = database_url();
        jc.nats.nats_url = nats_url();
        jc.schema = format!("{base}_jobs");
        jc.registry_url = format!("http://{registry_addr}").parse().expect("url");
        jc.ingest_url = format!("http://{ingest_addr}").parse().expect("url");
        jc.subject_prefix = prefix.clone();
        jc.stream = stream.clone();
        jc.ack_wait = tuning.ack_wait;
        jc.max_attempts = tuning.max_attempts;
        let jl = Listeners::ephemeral().await.expect("bind");
        let jobs_addr = jl.grpc_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            if let Err(e) = lmforge_jobs::serve(jc, jl, async {
                let _ = rx.await;
            })
            .await
            {
                eprintln!("jobs: {e}");
            }
        });
        stops.push(tx);
        let jobs = JobServiceClient::new(channel(jobs_addr));
        wait_ready(|| {
            let mut c = jobs.clone();
            async move {
                c.get_job(pb::GetJobRequest {
                    id: uuid::Uuid::nil().to_string(),
                })
                .await
            }
        })
        .await;
        Stack {
            label: label.to_owned(),
            schemas: vec![
                format!("{base}_reg"),
                format!("{base}_ing"),
                format!("{base}_jobs"),
            ],
            prefix,
            stream,
            artifacts,
            registry_url: format!("http://{registry_addr}"),
            ingest_url: format!("http://{ingest_addr}"),
            jobs_url: format!("http://{jobs_addr}"),
            jobs,
            registry,
            datasets,
            stops,
            workers: Vec::new(),
            dirs: Vec::new(),
        }
    }

    /// The trainer config for this stack (cache dir `cache`).
    pub fn trainer_config(&self, worker_id: &str, cache: &Path) -> lmforge_trainer::Config {
        let mut tc =
            lmforge_trainer::Config::try_parse_from(["lmforge-trainer"]).expect("defaults");
        tc.nats.nats_url = nats_url();
        tc.registry_url = self.registry_url.parse().expect("url");
        tc.ingest_url = self.ingest_url.parse().expect("url");
        tc.artifacts = self.artifacts.path().display().to_string();
        tc.cache_dir = cache.to_path_buf();
        tc.worker_id = worker_id.to_owned();
        tc.subject_prefix = self.prefix.clone();
        tc.stream = self.stream.clone();
        tc.progress_interval = Duration::ZERO;
        tc
    }

    /// Starts an in-process trainer worker.
    pub async fn start_worker(&mut self, worker_id: &str) {
        let cache = tempfile::tempdir().expect("temp dir");
        let config = self.trainer_config(worker_id, cache.path());
        self.dirs.push(cache);
        let listeners = Listeners::ephemeral().await.expect("bind");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            if let Err(e) = lmforge_trainer::serve(config, listeners, async {
                let _ = rx.await;
            })
            .await
            {
                eprintln!("trainer: {e}");
            }
        });
        self.workers.push(tx);
    }

    /// The environment that points an `lmforge-trainer` process at this stack.
    pub fn trainer_env(&self, worker_id: &str, cache: &Path) -> Vec<(String, String)> {
        [
            ("LMFORGE_NATS_URL", nats_url()),
            ("LMFORGE_REGISTRY_URL", self.registry_url.clone()),
            ("LMFORGE_INGEST_URL", self.ingest_url.clone()),
            (
                "LMFORGE_ARTIFACTS",
                self.artifacts.path().display().to_string(),
            ),
            ("LMFORGE_TRAINER_CACHE_DIR", cache.display().to_string()),
            ("LMFORGE_TRAINER_WORKER_ID", worker_id.to_owned()),
            ("LMFORGE_JOBS_SUBJECT_PREFIX", self.prefix.clone()),
            ("LMFORGE_JOBS_STREAM", self.stream.clone()),
            ("LMFORGE_TRAINER_PROGRESS_INTERVAL", "0ms".to_owned()),
            ("LMFORGE_TRAINER_LISTEN", "127.0.0.1:0".to_owned()),
            ("LMFORGE_TRAINER_ADMIN_LISTEN", "127.0.0.1:0".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Registers the tiny Llama fixture as `name` (version 1, …).
    pub async fn import_base(&mut self, name: &str) -> pb::ModelVersion {
        lmforge_registry_client::upload::register_dir(
            &mut self.registry,
            &fixture("tiny-llama"),
            pb::CreateModelVersionRequest {
                model_name: name.to_owned(),
                create_model_if_missing: true,
                created_by: "user:test".into(),
                ..Default::default()
            },
            Arc::new(|_: &str, _: u64, _: u64| {}),
        )
        .await
        .expect("import base model")
    }

    /// Uploads a generated chat dataset of `n` records; returns `name/1`.
    pub async fn upload_dataset(&mut self, name: &str, n: usize) -> String {
        let mut data = Vec::new();
        let topics = [
            "refund", "shipping", "invoice", "password", "warranty", "discount", "exchange",
            "delivery", "account", "payment", "coupon", "return",
        ];
        for i in 0..n {
            let topic = topics[i % topics.len()];
            let record = serde_json::json!({
                "id": format!("r{i}"),
                "messages": [
                    {"role": "user", "content": format!("question {i} about my {topic} number {}", i * 7919 % 1000)},
                    {"role": "assistant", "content": format!("answer {i}: your {topic} case {} is handled", i * 104729 % 997)},
                ],
            });
            data.extend(serde_json::to_vec(&record).expect("json"));
            data.push(b'\n');
        }
        let spec = pb::DatasetIngestSpec {
            dataset_name: name.to_owned(),
            filename: "chat.jsonl".into(),
            config: Some(pb::IngestConfig {
                dedup: Some(pb::DedupConfig {
                    exact: Some(false),
                    minhash: Some(pb::MinHashConfig {
                        enabled: Some(false),
                        ..Default::default()
                    }),
                }),
                split: Some(pb::SplitConfig {
                    train_ratio: Some(0.8),
                    eval_ratio: Some(0.2),
                    test_ratio: Some(0.0),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut messages = vec![pb::UploadDatasetRequest {
            payload: Some(pb::upload_dataset_request::Payload::Metadata(spec)),
        }];
        messages.push(pb::UploadDatasetRequest {
            payload: Some(pb::upload_dataset_request::Payload::Chunk(data)),
        });
        let response = self
            .datasets
            .upload_dataset(tokio_stream::iter(messages))
            .await
            .expect("upload dataset")
            .into_inner();
        let version = response.version.expect("version");
        format!("{}/{}", version.dataset_name, version.version)
    }

    pub async fn submit(&mut self, spec: pb::JobSpec) -> Result<pb::Job, tonic::Status> {
        self.jobs
            .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
            .await
            .map(|r| r.into_inner())
    }

    pub async fn get(&mut self, id: &str) -> pb::Job {
        self.jobs
            .get_job(pb::GetJobRequest { id: id.to_owned() })
            .await
            .expect("get job")
            .into_inner()
    }

    /// Polls until the job is in one of `states` (panics after `timeout`).
    pub async fn wait_for(
        &mut self,
        id: &str,
        states: &[pb::JobState],
        timeout: Duration,
    ) -> pb::Job {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.get(id).await;
            if states.iter().any(|s| *s as i32 == job.state) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} still {:?} after {timeout:?}: {:?}",
                pb::JobState::try_from(job.state),
                job.failure
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the in-process workers (a job in progress is given back to the queue).
    pub async fn stop_workers(&mut self) {
        for w in self.workers.drain(..) {
            let _ = w.send(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    pub async fn stop(mut self) {
        for w in self.workers.drain(..) {
            let _ = w.send(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        if let Ok(client) = async_nats::connect(nats_url()).await {
            let _ = async_nats::jetstream::new(client)
                .delete_stream(&self.stream)
                .await;
        }
        if let Ok(pool) = sqlx::PgPool::connect(&database_url()).await {
            for schema in &self.schemas {
                let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                    .execute(&pool)
                    .await;
            }
        }
    }
}

/// A small fine-tuning spec on `base` and `dataset`.
pub fn spec(base: &str, dataset: &str, output: &str, max_steps: u64) -> pb::JobSpec {
    pb::JobSpec {
        base: Some(pb::job_spec::Base::BaseModel(base.to_owned())),
        dataset_version: dataset.to_owned(),
        output_model_name: output.to_owned(),
        hyperparameters: Some(pb::Hyperparameters {
            learning_rate: Some(1e-3),
            training_length: Some(pb::hyperparameters::TrainingLength::MaxSteps(max_steps)),
            batch_size: Some(4),
            max_seq_len: Some(48),
            seed: Some(7),
            eval_every_steps: 2,
            checkpoint_every_steps: 2,
            ..Default::default()
        }),
        ..Default::default()
    }
}
