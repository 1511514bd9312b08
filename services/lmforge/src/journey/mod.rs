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
//!
//! - [`settings`]: where the services are and how big the run is (demo and test presets).
//! - [`answers`]: step 6 and 7, the questions through the gateway and where to look.

use std::net::SocketAddr;
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

mod answers;
mod settings;

pub use answers::{Answer, Comparison, random_hex};
pub use settings::{Endpoints, JourneyOptions, ScratchModel};

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
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
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
