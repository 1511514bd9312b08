//! The day-one journey that `lmforge demo` runs and the end-to-end tests check, one step at a
//! time against a running stack: upload the bundled bank-adviser chat set and print its
//! cleaning report → a base model (a Hugging Face directory imported, or a small model
//! trained from scratch on the bundled corpus with its own BPE tokenizer) → a fine-tuning job
//! followed with a progress bar → the new version with its lineage → alias `production` →
//! the same questions answered before and after fine-tuning through the gateway's OpenAI
//! HTTP API → where to look at traces and metrics.
//!
//! Each step is a method of [`Journey`], so a test can act between steps (kill a trainer
//! while the fine-tuning job runs); [`Journey::run`] chains them for the demo.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::dataset_service_client::DatasetServiceClient;
use lmforge_proto::v1::inference_service_client::InferenceServiceClient;
use lmforge_proto::v1::job_service_client::JobServiceClient;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use tonic::transport::Channel;

use crate::model_cmd::status_error;
use crate::stack::Stack;

/// Where the journey finds the services.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// Ingest gRPC.
    pub ingest: SocketAddr,
    /// Jobs gRPC.
    pub jobs: SocketAddr,
    /// Registry gRPC.
    pub registry: SocketAddr,
    /// Inference gRPC.
    pub inference: SocketAddr,
    /// Gateway gRPC (admin API: API keys).
    pub gateway: SocketAddr,
    /// Gateway OpenAI-compatible HTTP.
    pub gateway_http: SocketAddr,
    /// Every service's admin HTTP address (`/metrics`), by name.
    pub admin: Vec<(&'static str, SocketAddr)>,
}

impl Endpoints {
    /// The endpoints of a running stack.
    pub fn of(stack: &Stack) -> anyhow::Result<Self> {
        let grpc = |name: &str| {
            stack
                .service(name)
                .map(|s| s.grpc)
                .with_context(|| format!("the stack has no {name} service"))
        };
        Ok(Self {
            ingest: grpc("ingest")?,
            jobs: grpc("jobs")?,
            registry: grpc("registry")?,
            inference: grpc("inference")?,
            gateway: grpc("gateway")?,
            gateway_http: stack
                .service("gateway")
                .and_then(|s| s.http)
                .context("the gateway has no HTTP address")?,
            admin: stack.services.iter().map(|s| (s.name, s.admin)).collect(),
        })
    }
}

/// The architecture and length of the from-scratch base model.
#[derive(Debug, Clone)]
pub struct ScratchModel {
    /// Hidden size.
    pub hidden_size: u32,
    /// MLP size.
    pub intermediate_size: u32,
    /// Decoder layers.
    pub layers: u32,
    /// Attention heads.
    pub heads: u32,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: u32,
    /// BPE vocabulary size to train.
    pub vocab_size: u32,
    /// Optimizer steps of pretraining.
    pub steps: u64,
}

/// How big and how long the journey is.
#[derive(Debug, Clone)]
pub struct JourneyOptions {
    /// The directory with `chat.jsonl` and `corpus.txt` (`examples/bank-adviser`).
    pub examples: PathBuf,
    /// A Hugging Face checkpoint directory to import as the base instead of training one.
    pub base_model_dir: Option<PathBuf>,
    /// The from-scratch base model (when no directory is given).
    pub scratch: ScratchModel,
    /// Optimizer steps of fine-tuning.
    pub finetune_steps: u64,
    /// Fine-tuning learning rate.
    pub finetune_learning_rate: f64,
    /// Sequences per micro-batch.
    pub batch_size: u32,
    /// Max sequence length in tokens.
    pub max_seq_len: u32,
    /// Names: datasets `{prefix}-chat` / `{prefix}-corpus`, models `{prefix}-base` /
    /// `{prefix}-adviser`.
    pub prefix: String,
    /// Questions asked before and after fine-tuning.
    pub questions: Vec<String>,
    /// Tokens per answer.
    pub max_tokens: u32,
    /// Draw progress bars (a terminal) or stay quiet (tests).
    pub progress: bool,
    /// The gateway's bootstrap admin key (creates the journey's API key).
    pub admin_key: String,
    /// How long a training job may take before the journey gives up on it.
    pub job_timeout: Duration,
}

impl JourneyOptions {
    /// The demo's settings: a 4-layer model that pretrains and fine-tunes in a few minutes
    /// on 2 CPU cores.
    pub fn demo(examples: PathBuf, admin_key: String) -> Self {
        Self {
            examples,
            base_model_dir: None,
            scratch: ScratchModel {
                hidden_size: 128,
                intermediate_size: 384,
                layers: 4,
                heads: 4,
                kv_heads: 2,
                vocab_size: 1024,
                steps: 150,
            },
            finetune_steps: 240,
            finetune_learning_rate: 2e-3,
            batch_size: 8,
            max_seq_len: 128,
            prefix: "bank".to_owned(),
            questions: vec![
                "What is the rate on a one-year fixed deposit?".to_owned(),
                "银行卡丢了怎么办？".to_owned(),
                "Can you guarantee a 10% return?".to_owned(),
            ],
            max_tokens: 48,
            progress: true,
            admin_key,
            job_timeout: Duration::from_secs(30 * 60),
        }
    }

    /// Seconds-long settings for the end-to-end tests.
    pub fn tiny(examples: PathBuf, admin_key: String, prefix: String) -> Self {
        Self {
            scratch: ScratchModel {
                hidden_size: 32,
                intermediate_size: 64,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                vocab_size: 400,
                steps: 12,
            },
            finetune_steps: 12,
            batch_size: 4,
            max_seq_len: 96,
            prefix,
            questions: vec!["银行卡丢了怎么办？".to_owned()],
            max_tokens: 8,
            progress: false,
            job_timeout: Duration::from_secs(3 * 60),
            ..Self::demo(examples, admin_key)
        }
    }
}

/// One question answered by the base and the fine-tuned model.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The question.
    pub question: String,
    /// The base model's answer.
    pub before: Answer,
    /// The fine-tuned model's answer.
    pub after: Answer,
}

/// One chat completion through the gateway.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The model reference asked.
    pub model: String,
    /// The reply.
    pub text: String,
    /// The W3C trace id the request was sent with (look it up in Jaeger).
    pub trace_id: String,
}

/// What the journey made.
#[derive(Debug, Clone)]
pub struct JourneyReport {
    /// The cleaned chat dataset version.
    pub dataset: pb::DatasetVersion,
    /// Its cleaning report.
    pub dataset_report: pb::DatasetReport,
    /// The base model version.
    pub base: pb::ModelVersion,
    /// The fine-tuning job, finished.
    pub job: pb::Job,
    /// The fine-tuned version (now `production`).
    pub tuned: pb::ModelVersion,
    /// The answers before and after.
    pub answers: Vec<Comparison>,
}

/// The journey's clients and settings.
pub struct Journey {
    endpoints: Endpoints,
    options: JourneyOptions,
    ingest: DatasetServiceClient<Channel>,
    jobs: JobServiceClient<Channel>,
    registry: RegistryServiceClient<Channel>,
    inference: InferenceServiceClient<Channel>,
    http: reqwest::Client,
    step: usize,
    api_key: Option<String>,
}

const STEPS: usize = 7;

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

impl Journey {
    /// Connects to every service.
    pub async fn connect(endpoints: Endpoints, options: JourneyOptions) -> anyhow::Result<Self> {
        let inference_channel = lmforge_runtime::args::parse_endpoint(&url(endpoints.inference))
            .map_err(anyhow::Error::msg)?
            .connect()
            .await
            .context("cannot reach the inference service")?;
        Ok(Self {
            ingest: crate::dataset_cmd::connect(&url(endpoints.ingest)).await?,
            jobs: crate::job_cmd::connect(&url(endpoints.jobs)).await?,
            registry: crate::model_cmd::connect(&url(endpoints.registry)).await?,
            inference: InferenceServiceClient::new(inference_channel),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()?,
            endpoints,
            options,
            step: 0,
            api_key: None,
        })
    }

    fn header(&mut self, title: &str) {
        self.step += 1;
        println!("\n━━ [{}/{STEPS}] {title}", self.step);
    }

    /// Runs every step and prints where to look next.
    pub async fn run(&mut self) -> anyhow::Result<JourneyReport> {
        let (dataset, dataset_report) = self.upload_dataset().await?;
        let base = self.base_model().await?;
        let job = self.submit_finetune(&base, &dataset).await?;
        let job = self.follow(&job.id).await?;
        let tuned = self.promote(&job).await?;
        let answers = self.compare(&base, &tuned).await?;
        self.where_to_look(&answers);
        Ok(JourneyReport {
            dataset,
            dataset_report,
            base,
            job,
            tuned,
            answers,
        })
    }

    /// Step 1: uploads `chat.jsonl` with the compliance settings of a bank (Chinese and
    /// English kept, promises of returns dropped) and prints the cleaning report.
    pub async fn upload_dataset(
        &mut self,
    ) -> anyhow::Result<(pb::DatasetVersion, pb::DatasetReport)> {
        self.header("upload the bank-adviser chat set and clean it");
        let file = self.options.examples.join("chat.jsonl");
        let args = upload_args(&[
            file.to_string_lossy().as_ref(),
            "--name",
            &format!("{}-chat", self.options.prefix),
            "--format",
            "openai",
            "--languages",
            "en,zh",
            "--blocklist",
            "保本,无风险,guaranteed return",
            "--train-ratio",
            "0.9",
            "--seed",
            "7",
            "--description",
            "bundled bank-adviser chat set (examples/bank-adviser)",
        ])?;
        let (version, report) =
            crate::dataset_cmd::upload_and_report(&mut self.ingest, &args, self.options.progress)
                .await?;
        anyhow::ensure!(
            report.output_records > 0,
            "cleaning left no records of {}",
            file.display()
        );
        println!(
            "✔ {}/{}: {} of {} lines kept after cleaning and deduplication",
            version.dataset_name, version.version, report.output_records, report.input_lines
        );
        Ok((version, report))
    }

    /// Step 2: the base model: the given Hugging Face directory imported, or a model trained
    /// from scratch on `corpus.txt` with a BPE tokenizer learned from it.
    pub async fn base_model(&mut self) -> anyhow::Result<pb::ModelVersion> {
        let name = format!("{}-base", self.options.prefix);
        if let Some(dir) = self.options.base_model_dir.clone() {
            self.header(&format!("import the base model from {}", dir.display()));
            let version = crate::model_cmd::import(
                &mut self.registry,
                &dir,
                &name,
                None,
                self.options.progress,
            )
            .await?;
            println!("✔ registered {}/{}", version.model_name, version.version);
            // Fine-tuning sequences must fit the imported model's context.
            let context = std::fs::read_to_string(dir.join("config.json"))
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|config| config["max_position_embeddings"].as_u64());
            if let Some(context) = context {
                self.options.max_seq_len = self.options.max_seq_len.min(context as u32);
            }
            return Ok(version);
        }
        self.header("train a small base model from scratch on the bundled corpus");
        let corpus = self.options.examples.join("corpus.txt");
        let args = upload_args(&[
            corpus.to_string_lossy().as_ref(),
            "--name",
            &format!("{}-corpus", self.options.prefix),
            "--format",
            "text",
            "--train-ratio",
            "1.0",
            "--no-near-dedup",
        ])?;
        let response = crate::dataset_cmd::upload(&mut self.ingest, &args, false).await?;
        let corpus_version = response.version.unwrap_or_default();
        println!(
            "corpus {}/{}: {} documents",
            corpus_version.dataset_name, corpus_version.version, corpus_version.record_count
        );
        let s = &self.options.scratch;
        let spec = pb::JobSpec {
            base: Some(pb::job_spec::Base::FromScratch(pb::FromScratch {
                architecture: Some(pb::ArchitectureConfig {
                    architecture: "qwen2".into(),
                    hidden_size: s.hidden_size,
                    intermediate_size: s.intermediate_size,
                    num_hidden_layers: s.layers,
                    num_attention_heads: s.heads,
                    num_key_value_heads: s.kv_heads,
                    max_position_embeddings: self.options.max_seq_len.max(256),
                    ..Default::default()
                }),
                tokenizer: Some(pb::TokenizerSpec {
                    source: Some(pb::tokenizer_spec::Source::Train(pb::TokenizerTraining {
                        vocab_size: Some(s.vocab_size),
                        ..Default::default()
                    })),
                }),
            })),
            dataset_version: corpus_version.id.clone(),
            method: Some(pb::job_spec::Method::Full(pb::FullFineTune::default())),
            hyperparameters: Some(self.hyperparameters(s.steps, 3e-3)),
            output_model_name: name,
            description: "from scratch on examples/bank-adviser/corpus.txt".to_owned(),
            ..Default::default()
        };
        let job = self.submit(spec).await?;
        let job = self.follow(&job.id).await?;
        let version = self.result_version(&job).await?;
        println!(
            "✔ base model {}/{} ({} bytes of weights and tokenizer)",
            version.model_name, version.version, version.total_size_bytes
        );
        Ok(version)
    }

    fn hyperparameters(&self, steps: u64, learning_rate: f64) -> pb::Hyperparameters {
        pb::Hyperparameters {
            learning_rate: Some(learning_rate),
            training_length: Some(pb::hyperparameters::TrainingLength::MaxSteps(steps)),
            batch_size: Some(self.options.batch_size),
            max_seq_len: Some(self.options.max_seq_len),
            warmup: Some(pb::hyperparameters::Warmup::WarmupRatio(0.1)),
            eval_every_steps: (steps / 4).max(1) as u32,
            checkpoint_every_steps: (steps / 4).max(1) as u32,
            seed: Some(7),
            ..Default::default()
        }
    }

    async fn submit(&mut self, spec: pb::JobSpec) -> anyhow::Result<pb::Job> {
        let job = self
            .jobs
            .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
            .await
            .map_err(status_error)?
            .into_inner();
        println!("job {} queued", job.id);
        Ok(job)
    }

    /// Step 3: submits full fine-tuning of `base` on the cleaned chat set (assistant turns
    /// only are targets).
    pub async fn submit_finetune(
        &mut self,
        base: &pb::ModelVersion,
        dataset: &pb::DatasetVersion,
    ) -> anyhow::Result<pb::Job> {
        self.header(&format!(
            "fine-tune {}/{} on {}/{}",
            base.model_name, base.version, dataset.dataset_name, dataset.version
        ));
        let spec = pb::JobSpec {
            base: Some(pb::job_spec::Base::BaseModel(format!(
                "{}/{}",
                base.model_name, base.version
            ))),
            dataset_version: dataset.id.clone(),
            method: Some(pb::job_spec::Method::Full(pb::FullFineTune::default())),
            hyperparameters: Some(self.hyperparameters(
                self.options.finetune_steps,
                self.options.finetune_learning_rate,
            )),
            output_model_name: format!("{}-adviser", self.options.prefix),
            output_tags: [("domain".to_owned(), "bank".to_owned())].into(),
            description: "bank adviser, fine-tuned by lmforge demo".to_owned(),
            ..Default::default()
        };
        self.submit(spec).await
    }

    /// Follows a job to its end (a live progress bar with loss, tokens/s and ETA when
    /// drawing); fails unless it succeeded.
    pub async fn follow(&mut self, job_id: &str) -> anyhow::Result<pb::Job> {
        let started = Instant::now();
        let timeout = self.options.job_timeout;
        let followed = if self.options.progress {
            tokio::time::timeout(
                timeout,
                crate::job_cmd::watch(&mut self.jobs, job_id, false),
            )
            .await
        } else {
            tokio::time::timeout(timeout, self.wait_quietly(job_id)).await
        };
        let job = followed.map_err(|_| {
            anyhow::anyhow!(
                "job {job_id} did not finish within {}s (is a trainer running? `lmforge job get {job_id}`)",
                timeout.as_secs()
            )
        })??;
        if job.state != pb::JobState::Succeeded as i32 {
            let failure = job.failure.clone().unwrap_or_default();
            anyhow::bail!(
                "job {job_id} ended {}: {}: {}",
                crate::job_cmd::state_name(job.state),
                failure.code,
                failure.message
            );
        }
        let loss = job
            .result_metrics
            .get("eval_loss")
            .or_else(|| job.result_metrics.get("train_loss"))
            .map(|l| format!(", loss {l:.3}"))
            .unwrap_or_default();
        println!(
            "✔ job {job_id} succeeded in {:.0}s on attempt {} ({}){loss}",
            started.elapsed().as_secs_f64(),
            job.attempt,
            job.worker_id
        );
        Ok(job)
    }

    async fn wait_quietly(&mut self, job_id: &str) -> anyhow::Result<pb::Job> {
        loop {
            let job = self
                .jobs
                .get_job(pb::GetJobRequest {
                    id: job_id.to_owned(),
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if matches!(
                pb::JobState::try_from(job.state),
                Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
            ) {
                return Ok(job);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The secret of the API key the journey made (after [`Journey::compare`]).
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }

    /// Cancels the jobs an interrupted earlier run left queued or running, so that this run's
    /// jobs do not wait behind them; returns how many.
    pub async fn cancel_leftovers(&mut self) -> anyhow::Result<usize> {
        let mut cancelled = 0;
        for state in [pb::JobState::Queued, pb::JobState::Running] {
            let jobs = self
                .jobs
                .list_jobs(pb::ListJobsRequest {
                    page_size: 1000,
                    states: vec![state as i32],
                    ..Default::default()
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .jobs;
            for job in jobs {
                self.jobs
                    .cancel_job(pb::CancelJobRequest {
                        id: job.id.clone(),
                        reason: "left over from an interrupted lmforge demo".to_owned(),
                    })
                    .await
                    .map_err(status_error)?;
                cancelled += 1;
            }
        }
        Ok(cancelled)
    }

    /// The current job (for tests that act while it runs).
    pub async fn job(&mut self, job_id: &str) -> anyhow::Result<pb::Job> {
        Ok(self
            .jobs
            .get_job(pb::GetJobRequest {
                id: job_id.to_owned(),
            })
            .await
            .map_err(status_error)?
            .into_inner())
    }

    async fn result_version(&mut self, job: &pb::Job) -> anyhow::Result<pb::ModelVersion> {
        let result = job
            .result_model_version
            .clone()
            .context("the job registered no model version")?;
        Ok(self
            .registry
            .get_model_version(pb::GetModelVersionRequest {
                model_name: result.name,
                version: result.version,
            })
            .await
            .map_err(status_error)?
            .into_inner())
    }

    /// Steps 4 and 5: shows the new version with its lineage and points `production` at it.
    pub async fn promote(&mut self, job: &pb::Job) -> anyhow::Result<pb::ModelVersion> {
        self.header("the new version in the registry, with its lineage");
        let version = self.result_version(job).await?;
        crate::model_cmd::print_versions(std::slice::from_ref(&version));
        let lineage = version.lineage.clone().unwrap_or_default();
        let base = lineage
            .base_model_version
            .as_ref()
            .map(|b| format!("{}/{}", b.name, b.version))
            .unwrap_or_else(|| "-".to_owned());
        println!(
            "lineage: base {base}, dataset version {}, job {}",
            lineage.dataset_version_id, lineage.training_job_id
        );
        self.header("alias production → the new version");
        let moved = self
            .registry
            .set_alias(pb::SetAliasRequest {
                model_name: version.model_name.clone(),
                alias: "production".to_owned(),
                version: version.version,
                actor: "user:lmforge-demo".to_owned(),
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner();
        match moved.previous_version {
            Some(previous) => println!(
                "✔ {}@production: {previous} → {}",
                version.model_name, version.version
            ),
            None => println!("✔ {}@production → {}", version.model_name, version.version),
        }
        Ok(version)
    }

    /// Step 6: loads both versions and asks each question through the gateway's OpenAI HTTP
    /// API with an API key made for the purpose.
    pub async fn compare(
        &mut self,
        base: &pb::ModelVersion,
        tuned: &pb::ModelVersion,
    ) -> anyhow::Result<Vec<Comparison>> {
        self.header("the same questions before and after fine-tuning, via the gateway");
        let before = format!("{}/{}", base.model_name, base.version);
        let after = format!("{}@production", tuned.model_name);
        for model in [&before, &after] {
            self.inference
                .load_model(pb::LoadModelRequest {
                    model_ref: model.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status_error)
                .with_context(|| format!("loading {model}"))?;
        }
        let mut admin =
            crate::key_cmd::connect(&url(self.endpoints.gateway), &self.options.admin_key).await?;
        let key = admin
            .create_api_key(pb::CreateApiKeyRequest {
                name: format!("{}-demo", self.options.prefix),
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner();
        println!(
            "POST http://{}/v1/chat/completions  (API key {})",
            self.endpoints.gateway_http,
            key.key.as_ref().map(|k| k.id.as_str()).unwrap_or("-")
        );
        self.api_key = Some(key.secret.clone());
        let mut answers = Vec::new();
        for question in self.options.questions.clone() {
            let before = self.ask(&key.secret, &before, &question).await?;
            let after = self.ask(&key.secret, &after, &question).await?;
            println!("\nQ: {question}");
            println!("  before ({}): {}", before.model, one_line(&before.text));
            println!("  after  ({}): {}", after.model, one_line(&after.text));
            answers.push(Comparison {
                question,
                before,
                after,
            });
        }
        Ok(answers)
    }

    /// One greedy chat completion through the gateway, sent with a fresh W3C trace id.
    pub async fn ask(&self, secret: &str, model: &str, question: &str) -> anyhow::Result<Answer> {
        let trace_id = random_hex(16);
        let response = self
            .http
            .post(format!(
                "http://{}/v1/chat/completions",
                self.endpoints.gateway_http
            ))
            .bearer_auth(secret)
            .header("traceparent", format!("00-{trace_id}-{}-01", random_hex(8)))
            .json(&serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": self.options.max_tokens,
                "temperature": 0,
            }))
            .send()
            .await
            .context("calling the gateway")?;
        let status = response.status();
        let body = response.text().await.context("the gateway's answer")?;
        anyhow::ensure!(status.is_success(), "the gateway answered {status}: {body}");
        let body: serde_json::Value =
            serde_json::from_str(&body).context("the gateway's answer is not JSON")?;
        let text = body["choices"][0]["message"]["content"]
            .as_str()
            .context("no choices[0].message.content in the gateway's answer")?
            .to_owned();
        Ok(Answer {
            model: model.to_owned(),
            text,
            trace_id,
        })
    }

    /// Step 7: where the traces and metrics of what just happened are.
    pub fn where_to_look(&mut self, answers: &[Comparison]) {
        self.header("where to look next");
        match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Ok(endpoint) if !endpoint.trim().is_empty() => {
                println!("traces were exported to {endpoint}; in Jaeger (http://127.0.0.1:16686):");
                for answer in answers.iter().flat_map(|c| [&c.before, &c.after]) {
                    println!("  trace {}  ({})", answer.trace_id, answer.model);
                }
            }
            _ => println!(
                "traces: start Jaeger (`docker compose -f deploy/docker-compose.yml up -d jaeger`), \
                 set OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 and run again; each \
                 answer above is one trace gateway → inference, each job one trace jobs → \
                 NATS → trainer → registry"
            ),
        }
        println!("metrics (Prometheus text):");
        for (name, admin) in &self.endpoints.admin {
            println!("  {name:<10} http://{admin}/metrics");
        }
    }
}

fn one_line(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.is_empty() {
        "(empty)".to_owned()
    } else {
        flat
    }
}

/// `n` unpredictable bytes as hex (trace and span ids, demo keys; never all zero): a
/// SHA-256 of the clock, the process id, a counter and the address of a fresh allocation.
pub fn random_hex(n: usize) -> String {
    use sha2::Digest;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let fresh = Box::new(0u8);
    let seed = format!(
        "{:?}{}{}{:p}",
        Instant::now(),
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        &*fresh
    );
    let digest = sha2::Sha256::digest(format!("{seed}{:?}", std::time::SystemTime::now()));
    let mut bytes = digest[..n].to_vec();
    bytes[0] |= 1;
    hex::encode(bytes)
}

#[derive(Debug, clap::Parser)]
struct UploadCli {
    #[command(flatten)]
    args: crate::dataset_cmd::UploadArgs,
}

/// `lmforge dataset upload` options from its command-line words.
fn upload_args(words: &[&str]) -> anyhow::Result<crate::dataset_cmd::UploadArgs> {
    let cli = UploadCli::try_parse_from(std::iter::once("upload").chain(words.iter().copied()))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(cli.args)
}
