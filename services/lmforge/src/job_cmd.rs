//! `lmforge job …`: training jobs from the command line. `submit` builds a spec from flags (or
//! reads one from a JSON file), `watch` draws a live progress bar with loss, tokens/s and ETA.

use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

/// `lmforge job` arguments.
#[derive(Debug, clap::Args)]
pub struct JobArgs {
    /// Address of the jobs service.
    #[arg(
        long,
        env = "LMFORGE_JOBS_URL",
        default_value = "http://127.0.0.1:50052",
        global = true
    )]
    pub jobs_url: String,
    #[command(subcommand)]
    pub command: JobCommand,
}

/// The job subcommands.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    /// Submit a fine-tuning job.
    Submit(SubmitArgs),
    /// List jobs, newest first.
    List {
        /// Only jobs in this state (queued, running, succeeded, failed, cancelled).
        #[arg(long)]
        state: Option<String>,
        /// Only jobs whose output model has this name.
        #[arg(long, default_value = "")]
        model: String,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: i32,
    },
    /// Show one job.
    Get {
        /// Job id.
        id: String,
    },
    /// Follow a job until it ends: progress bar with loss, tokens/s and ETA.
    Watch {
        /// Job id.
        id: String,
        /// Also print the job's log lines.
        #[arg(long)]
        logs: bool,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        id: String,
        /// Why.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Print a job's log.
    Logs {
        /// Job id.
        id: String,
    },
}

/// `lmforge job submit` flags.
#[derive(Debug, clap::Args)]
pub struct SubmitArgs {
    /// Base model reference (`name@alias`, `name/3`).
    #[arg(long, required_unless_present = "spec")]
    pub base: Option<String>,
    /// Dataset version reference (`name/3`, `name@latest`).
    #[arg(long, required_unless_present = "spec")]
    pub dataset: Option<String>,
    /// Registered model that receives the result.
    #[arg(long, required_unless_present = "spec")]
    pub output: Option<String>,
    /// Alias to move to the result when its eval loss is better.
    #[arg(long, default_value = "")]
    pub alias: String,
    /// `full` or `lora`.
    #[arg(long, default_value = "full")]
    pub method: String,
    /// LoRA rank.
    #[arg(long)]
    pub lora_rank: Option<u32>,
    /// Learning rate.
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Epochs.
    #[arg(long, conflicts_with = "max_steps")]
    pub epochs: Option<u32>,
    /// Optimizer steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Sequences per micro-batch.
    #[arg(long)]
    pub batch_size: Option<u32>,
    /// Max sequence length.
    #[arg(long)]
    pub max_seq_len: Option<u32>,
    /// Evaluate every N steps (0: each epoch).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u32,
    /// Checkpoint every N steps (0: each epoch).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u32,
    /// Seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Priority in [-100, 100].
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
    /// Idempotency key.
    #[arg(long, default_value = "")]
    pub request_id: String,
    /// Read the whole JobSpec from this JSON file instead (protobuf JSON field names).
    #[arg(long)]
    pub spec: Option<std::path::PathBuf>,
    /// Follow the job after submitting it.
    #[arg(long)]
    pub watch: bool,
}

/// A jobs client on `url`.
pub async fn connect(url: &str) -> anyhow::Result<JobServiceClient<Channel>> {
    let endpoint = lmforge_runtime::args::parse_endpoint(url).map_err(anyhow::Error::msg)?;
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the jobs service at {url}"))?;
    Ok(JobServiceClient::new(channel))
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// The lowercase name of a job state.
pub fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state).unwrap_or_default() {
        pb::JobState::Queued => "queued",
        pb::JobState::Running => "running",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
        pb::JobState::Unspecified => "-",
    }
}

fn state_of(name: &str) -> anyhow::Result<pb::JobState> {
    Ok(match name {
        "queued" => pb::JobState::Queued,
        "running" => pb::JobState::Running,
        "succeeded" => pb::JobState::Succeeded,
        "failed" => pb::JobState::Failed,
        "cancelled" => pb::JobState::Cancelled,
        other => anyhow::bail!("unknown state `{other}`"),
    })
}

/// The JobSpec the submit flags describe.
pub fn spec_from_args(args: &SubmitArgs) -> anyhow::Result<pb::JobSpec> {
    use pb::hyperparameters::TrainingLength;
    let method = match args.method.as_str() {
        "full" => pb::job_spec::Method::Full(pb::FullFineTune::default()),
        "lora" => pb::job_spec::Method::Lora(pb::LoraConfig {
            rank: args.lora_rank,
            ..Default::default()
        }),
        other => anyhow::bail!("--method: `{other}` is not full or lora"),
    };
    let training_length = match (args.epochs, args.max_steps) {
        (Some(e), _) => Some(TrainingLength::Epochs(e)),
        (None, Some(s)) => Some(TrainingLength::MaxSteps(s)),
        _ => None,
    };
    Ok(pb::JobSpec {
        client_request_id: args.request_id.clone(),
        base: args.base.clone().map(pb::job_spec::Base::BaseModel),
        dataset_version: args.dataset.clone().unwrap_or_default(),
        method: Some(method),
        hyperparameters: Some(pb::Hyperparameters {
            learning_rate: args.learning_rate,
            training_length,
            batch_size: args.batch_size,
            max_seq_len: args.max_seq_len,
            eval_every_steps: args.eval_every,
            checkpoint_every_steps: args.checkpoint_every,
            seed: args.seed,
            ..Default::default()
        }),
        output_model_name: args.output.clone().unwrap_or_default(),
        output_alias: args.alias.clone(),
        priority: args.priority,
        ..Default::default()
    })
}

fn print_job(job: &pb::Job) {
    let spec = job.spec.clone().unwrap_or_default();
    println!("id:        {}", job.id);
    println!("state:     {}", state_name(job.state));
    println!("attempt:   {}/{}", job.attempt, job.max_attempts);
    if let Some(base) = &job.resolved_base_model {
        println!("base:      {}/{}", base.name, base.version);
    }
    println!("dataset:   {}", job.resolved_dataset_version_id);
    println!("output:    {}", spec.output_model_name);
    if !job.worker_id.is_empty() {
        println!("worker:    {}", job.worker_id);
    }
    if let Some(p) = &job.latest_progress {
        println!(
            "progress:  step {}/{}  epoch {:.2}  loss {:.4}  lr {:.2e}  {:.0} tok/s",
            p.step, p.total_steps, p.epoch, p.loss, p.learning_rate, p.tokens_per_second
        );
    }
    if let Some(v) = &job.result_model_version {
        println!("result:    {}/{}", v.name, v.version);
    }
    let mut metrics: Vec<_> = job.result_metrics.iter().collect();
    metrics.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in metrics {
        println!("  {k}: {v:.4}");
    }
    if let Some(f) = &job.failure {
        println!("failure:   {}: {}", f.code, f.message);
    }
}

/// Follows a job with a progress bar; returns the job in its final state.
pub async fn watch(
    client: &mut JobServiceClient<Channel>,
    id: &str,
    logs: bool,
) -> anyhow::Result<pb::Job> {
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            id: id.to_owned(),
            include_logs: logs,
            after_sequence: 0,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} steps  {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let mut last = None;
    while let Some(event) = stream.next().await {
        let event = event.map_err(status_error)?;
        match event.event {
            Some(pb::job_event::Event::Snapshot(job)) => {
                bar.set_message(state_name(job.state).to_owned());
                if let Some(p) = &job.latest_progress {
                    bar.set_length(p.total_steps);
                    bar.set_position(p.step);
                }
                last = Some(job);
            }
            Some(pb::job_event::Event::StateChange(c)) => {
                bar.println(format!(
                    "{} → {}{}",
                    state_name(c.from),
                    state_name(c.to),
                    if c.reason.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", c.reason)
                    }
                ));
            }
            Some(pb::job_event::Event::Progress(p)) => {
                bar.set_length(p.total_steps);
                bar.set_position(p.step);
                let eta = p
                    .eta
                    .map(|d| format!("  ETA {}s", d.seconds))
                    .unwrap_or_default();
                let eval = p
                    .eval_loss
                    .map(|l| format!("  eval {l:.4}"))
                    .unwrap_or_default();
                bar.set_message(format!(
                    "loss {:.4}{eval}  {:.0} tok/s{eta}",
                    p.loss, p.tokens_per_second
                ));
            }
            Some(pb::job_event::Event::Checkpoint(c)) => {
                bar.println(format!(
                    "checkpoint at step {} (loss {:.4})",
                    c.step, c.loss
                ));
            }
            Some(pb::job_event::Event::Log(line)) => bar.println(line.message),
            Some(pb::job_event::Event::Finished(job)) => {
                bar.finish_and_clear();
                return Ok(job);
            }
            None => {}
        }
    }
    bar.finish_and_clear();
    last.context("the watch ended without the job")
}

/// Runs one `lmforge job` command.
pub async fn run(args: JobArgs) -> anyhow::Result<()> {
    let mut client = connect(&args.jobs_url).await?;
    match args.command {
        JobCommand::Submit(submit) => {
            let spec = match &submit.spec {
                Some(path) => {
                    let text = std::fs::read_to_string(path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    spec_from_json(&text)?
                }
                None => spec_from_args(&submit)?,
            };
            let job = client
                .submit_job(pb::SubmitJobRequest { spec: Some(spec) })
                .await
                .map_err(status_error)?
                .into_inner();
            println!("{}", job.id);
            if submit.watch {
                let job = watch(&mut client, &job.id, false).await?;
                print_job(&job);
                anyhow::ensure!(
                    job.state == pb::JobState::Succeeded as i32,
                    "job {} ended {}",
                    job.id,
                    state_name(job.state)
                );
            }
        }
        JobCommand::List {
            state,
            model,
            limit,
        } => {
            let states = match state {
                Some(s) => vec![state_of(&s)? as i32],
                None => vec![],
            };
            let jobs = client
                .list_jobs(pb::ListJobsRequest {
                    page_size: limit,
                    states,
                    output_model_name: model,
                    ..Default::default()
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .jobs;
            println!(
                "{:<36}  {:<10}  {:>7}  {:>9}  {:<24}",
                "ID", "STATE", "ATTEMPT", "STEP", "OUTPUT"
            );
            for job in jobs {
                let step = job
                    .latest_progress
                    .as_ref()
                    .map(|p| format!("{}/{}", p.step, p.total_steps))
                    .unwrap_or_else(|| "-".into());
                let output = match &job.result_model_version {
                    Some(v) => format!("{}/{}", v.name, v.version),
                    None => job.spec.clone().unwrap_or_default().output_model_name,
                };
                println!(
                    "{:<36}  {:<10}  {:>7}  {:>9}  {:<24}",
                    job.id,
                    state_name(job.state),
                    job.attempt,
                    step,
                    output
                );
            }
        }
        JobCommand::Get { id } => {
            let job = client
                .get_job(pb::GetJobRequest { id })
                .await
                .map_err(status_error)?
                .into_inner();
            print_job(&job);
        }
        JobCommand::Watch { id, logs } => {
            let job = watch(&mut client, &id, logs).await?;
            print_job(&job);
        }
        JobCommand::Cancel { id, reason } => {
            let job = client
                .cancel_job(pb::CancelJobRequest { id, reason })
                .await
                .map_err(status_error)?
                .into_inner();
            print_job(&job);
        }
        JobCommand::Logs { id } => {
            let mut page_token = String::new();
            loop {
                let page = client
                    .get_job_logs(pb::GetJobLogsRequest {
                        id: id.clone(),
                        page_size: 1000,
                        page_token: page_token.clone(),
                        ..Default::default()
                    })
                    .await
                    .map_err(status_error)?
                    .into_inner();
                for line in page.lines {
                    let who = if line.worker_id.is_empty() {
                        "jobs".to_owned()
                    } else {
                        line.worker_id
                    };
                    println!(
                        "[{}] attempt {} {who}: {}",
                        line.sequence, line.attempt, line.message
                    );
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
        }
    }
    Ok(())
}

/// A JobSpec from JSON: `{"base_model": …, "dataset_version": …, "output_model_name": …,
/// "method": "full"|"lora", "lora": {…}, "hyperparameters": {…}, …}` with the proto's field
/// names.
pub fn spec_from_json(text: &str) -> anyhow::Result<pb::JobSpec> {
    let v: serde_json::Value = serde_json::from_str(text).context("the spec is not JSON")?;
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let h = &v["hyperparameters"];
    let f64_of = |k: &str| h[k].as_f64();
    let u32_of = |k: &str| h[k].as_u64().map(|x| x as u32);
    use pb::hyperparameters::TrainingLength;
    let training_length = match (h["epochs"].as_u64(), h["max_steps"].as_u64()) {
        (Some(e), _) => Some(TrainingLength::Epochs(e as u32)),
        (None, Some(m)) => Some(TrainingLength::MaxSteps(m)),
        _ => None,
    };
    let method = match v["method"].as_str().unwrap_or("full") {
        "lora" => pb::job_spec::Method::Lora(pb::LoraConfig {
            rank: v["lora"]["rank"].as_u64().map(|x| x as u32),
            alpha: v["lora"]["alpha"].as_f64().map(|x| x as f32),
            dropout: v["lora"]["dropout"].as_f64().map(|x| x as f32),
            target_modules: v["lora"]["target_modules"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default(),
            merge_adapter: v["lora"]["merge_adapter"].as_bool().unwrap_or(false),
        }),
        _ => pb::job_spec::Method::Full(pb::FullFineTune::default()),
    };
    let base = match v["from_scratch"].as_object() {
        Some(_) => pb::job_spec::Base::FromScratch(from_scratch_json(&v["from_scratch"])),
        None => pb::job_spec::Base::BaseModel(s("base_model")),
    };
    Ok(pb::JobSpec {
        client_request_id: s("client_request_id"),
        base: Some(base),
        dataset_version: s("dataset_version"),
        method: Some(method),
        hyperparameters: Some(pb::Hyperparameters {
            learning_rate: f64_of("learning_rate"),
            training_length,
            batch_size: u32_of("batch_size"),
            gradient_accumulation_steps: u32_of("gradient_accumulation_steps"),
            max_seq_len: u32_of("max_seq_len"),
            weight_decay: f64_of("weight_decay"),
            max_grad_norm: f64_of("max_grad_norm"),
            seed: h["seed"].as_u64(),
            warmup: f64_of("warmup_ratio")
                .map(pb::hyperparameters::Warmup::WarmupRatio)
                .or(u32_of("warmup_steps").map(pb::hyperparameters::Warmup::WarmupSteps)),
            eval_every_steps: u32_of("eval_every_steps").unwrap_or(0),
            checkpoint_every_steps: u32_of("checkpoint_every_steps").unwrap_or(0),
            ..Default::default()
        }),
        output_model_name: s("output_model_name"),
        output_alias: s("output_alias"),
        description: s("description"),
        priority: v["priority"].as_i64().unwrap_or(0) as i32,
        ..Default::default()
    })
}

/// `"from_scratch": {"architecture": {…ArchitectureConfig fields…}, "tokenizer": {"train":
/// {"vocab_size", "min_frequency"}} | {"from_model": "name@alias"}}`.
fn from_scratch_json(v: &serde_json::Value) -> pb::FromScratch {
    let a = &v["architecture"];
    let n = |k: &str| a[k].as_u64().unwrap_or(0) as u32;
    let t = &v["tokenizer"];
    let source = match t["from_model"].as_str() {
        Some(model) => pb::tokenizer_spec::Source::FromModel(model.to_owned()),
        None => pb::tokenizer_spec::Source::Train(pb::TokenizerTraining {
            vocab_size: t["train"]["vocab_size"].as_u64().map(|x| x as u32),
            min_frequency: t["train"]["min_frequency"].as_u64().map(|x| x as u32),
            ..Default::default()
        }),
    };
    pb::FromScratch {
        architecture: Some(pb::ArchitectureConfig {
            architecture: a["architecture"].as_str().unwrap_or("llama").to_owned(),
            vocab_size: n("vocab_size"),
            hidden_size: n("hidden_size"),
            intermediate_size: n("intermediate_size"),
            num_hidden_layers: n("num_hidden_layers"),
            num_attention_heads: n("num_attention_heads"),
            num_key_value_heads: n("num_key_value_heads"),
            max_position_embeddings: n("max_position_embeddings"),
            ..Default::default()
        }),
        tokenizer: Some(pb::TokenizerSpec {
            source: Some(source),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The from-scratch spec the README's by-hand journey submits is the demo's.
    #[test]
    fn the_bundled_scratch_spec_reads_as_a_from_scratch_job() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/bank-adviser/scratch.json"
        );
        let spec = spec_from_json(&std::fs::read_to_string(path).expect("bundled")).expect("spec");
        let Some(pb::job_spec::Base::FromScratch(scratch)) = spec.base else {
            panic!("not from scratch: {:?}", spec.base);
        };
        let arch = scratch.architecture.expect("architecture");
        assert_eq!(arch.architecture, "qwen2");
        assert_eq!((arch.hidden_size, arch.num_hidden_layers), (128, 4));
        assert!(matches!(
            scratch.tokenizer.and_then(|t| t.source),
            Some(pb::tokenizer_spec::Source::Train(pb::TokenizerTraining {
                vocab_size: Some(1024),
                ..
            }))
        ));
        assert_eq!(spec.dataset_version, "bank-corpus@latest");
        assert_eq!(spec.output_model_name, "bank-base");
        let h = spec.hyperparameters.expect("hyperparameters");
        assert_eq!(
            h.training_length,
            Some(pb::hyperparameters::TrainingLength::MaxSteps(150))
        );
        assert_eq!(
            h.warmup,
            Some(pb::hyperparameters::Warmup::WarmupRatio(0.1))
        );
    }
}
