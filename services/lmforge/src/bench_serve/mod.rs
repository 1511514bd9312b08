//! `lmforge bench serve`: a load generator for `InferenceService.GenerateStream`.
//!
//! At each concurrency level it sends requests closed-loop (C clients back to back) or with
//! Poisson arrivals (at most C in flight), with prompt and output lengths drawn from seeded
//! distributions, and reports requests/s, output tokens/s, time to first token, inter-token
//! latency and end-to-end latency (p50/p99) as a table and as JSON. Without `--inference` it
//! benchmarks a BENCH.md shape end to end: random checkpoint, in-process stack, import, load,
//! the levels, then `transformers` on the same checkpoint for the ratio checks.
//!
//! - [`stats`]: length distributions, Poisson gaps, percentiles.
//! - [`load`]: the load generator and its per-request timing.
//! - [`report`]: per-level figures, target checks, table and JSON.
//! - [`local`]: the random checkpoint and the in-process stack.
//! - [`reference`]: the `transformers` reference script.

pub mod load;
pub mod local;
pub mod reference;
pub mod report;
pub mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::inference_service_client::InferenceServiceClient;
use lmforge_runtime::args::{NatsArgs, PostgresArgs, parse_duration};
use serde_json::json;
use tonic::transport::Channel;

use load::{Arrival, LevelPlan, RequestSpec};
use local::{LocalOptions, LocalStack, Shape};
use reference::Reference;
use report::LevelReport;
use stats::LengthDist;

/// `lmforge bench …`.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Load-test an inference service (GenerateStream) at several concurrency levels; without
    /// --inference, start the stack in this process on a random checkpoint of --shape.
    Serve(ServeArgs),
}

/// How requests arrive (`--arrival`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArrivalKind {
    /// C clients, each sending its next request when its previous one ends.
    Closed,
    /// Poisson arrivals at --rate requests/s, at most C in flight.
    Poisson,
}

/// Serving weights of `bench serve`'s local checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Weights {
    /// As written: f32.
    F32,
    /// Quantized to q8_0 when the inference service loads it.
    #[value(name = "q8_0")]
    Q8_0,
}

impl Weights {
    fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Q8_0 => "q8_0",
        }
    }
}

/// Flags of `lmforge bench serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Address of a running inference service. Without it, a random-weight checkpoint of
    /// --shape is served by the whole stack started in this process.
    #[arg(long = "inference")]
    pub inference_url: Option<String>,
    /// Model reference to send requests to (with --inference); empty → the default model.
    #[arg(long, default_value = "")]
    pub model: String,
    /// BENCH.md shape of the local checkpoint (also picks the ratio checks).
    #[arg(long, value_enum, default_value_t = Shape::Tiny)]
    pub shape: Shape,
    /// Serving weights of the local checkpoint: as stored (f32) or quantized to q8_0 at load
    /// (the transformers reference stays f32).
    #[arg(long, value_enum, default_value_t = Weights::F32, conflicts_with = "inference_url")]
    pub weights: Weights,
    /// Concurrency levels, one run each: clients (closed) or the in-flight cap (Poisson).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64",
          value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: Vec<u32>,
    /// Arrival process.
    #[arg(long, value_enum, default_value_t = ArrivalKind::Closed)]
    pub arrival: ArrivalKind,
    /// Mean Poisson arrival rate in requests/s (with --arrival poisson).
    #[arg(long, required_if_eq("arrival", "poisson"))]
    pub rate: Option<f64>,
    /// Requests per level (default: 4 × concurrency, at least 16).
    #[arg(long, conflicts_with = "duration")]
    pub requests: Option<usize>,
    /// Send new requests for this long per level instead of a fixed count (e.g. 30s).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Prompt length in tokens: `32` or uniform `16..64` (inclusive); in words with --text.
    #[arg(long, default_value = "32")]
    pub prompt_len: LengthDist,
    /// Output length (max_tokens): `64` or uniform `32..128` (inclusive).
    #[arg(long, default_value = "64")]
    pub output_len: LengthDist,
    /// Send prompts as text (random words) instead of token ids.
    #[arg(long)]
    pub text: bool,
    /// Draw prompt token ids below this (default: the --shape's vocabulary).
    #[arg(long)]
    pub vocab_size: Option<u32>,
    /// Seeds prompts, lengths, sampling and arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling temperature; 0 is greedy, like the reference.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Let EOS end a request early (default: ignore_eos, every request makes its max_tokens).
    #[arg(long)]
    pub respect_eos: bool,
    /// Requests sent one by one before the first level, not counted.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// A request not finished after this long counts as failed.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Python with torch + transformers for the reference (default: .venv-bench, then
    /// ~/.cache/lmforge-venv); local runs only.
    #[arg(long, env = "LMFORGE_BENCH_PYTHON")]
    pub reference: Option<PathBuf>,
    /// Skip the transformers reference.
    #[arg(long)]
    pub no_reference: bool,
    /// Exit non-zero when a target check fails (failed requests always do).
    #[arg(long)]
    pub strict: bool,
    #[command(flatten)]
    pub postgres: PostgresArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// How long the local stack may take to report SERVING.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
}

/// Runs `lmforge bench …`.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Serve(args) => serve(args).await,
    }
}

impl ServeArgs {
    fn arrival(&self) -> anyhow::Result<Arrival> {
        Ok(match self.arrival {
            ArrivalKind::Closed => Arrival::Closed,
            ArrivalKind::Poisson => {
                let rate = self.rate.context("--arrival poisson needs --rate")?;
                ensure!(
                    rate.is_finite() && rate > 0.0,
                    "--rate must be a positive number of requests per second"
                );
                Arrival::Poisson { rate }
            }
        })
    }

    /// Requests of a level at `concurrency`: `--requests`, nothing with `--duration`, else
    /// enough for every client to send several.
    fn requests(&self, concurrency: usize) -> Option<usize> {
        match (self.requests, self.duration) {
            (Some(n), _) => Some(n),
            (None, Some(_)) => None,
            (None, None) => Some((4 * concurrency).max(16)),
        }
    }

    fn spec(&self, model: String) -> RequestSpec {
        RequestSpec {
            model,
            prompt_len: self.prompt_len,
            output_len: self.output_len,
            vocab_size: self
                .vocab_size
                .unwrap_or(self.shape.config().vocab_size as u32),
            text: self.text,
            temperature: self.temperature,
            ignore_eos: !self.respect_eos,
        }
    }
}

/// What a measured run produced.
struct Measured {
    levels: Vec<LevelReport>,
    model: String,
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let arrival = args.arrival()?;
    ensure!(args.requests != Some(0), "--requests must be at least 1");
    let (measured, reference, target) = match args.inference_url.clone() {
        Some(url) => {
            let client = crate::generate_cmd::connect(&url).await?;
            let measured = measure(&args, arrival, client, args.model.clone()).await?;
            if !args.no_reference {
                eprintln!(
                    "note: no transformers reference against --inference (it needs the \
                     checkpoint); run without --inference for the side-by-side figures"
                );
            }
            (measured, None, url)
        }
        None => {
            let (measured, reference) = local_run(&args, arrival).await?;
            (measured, reference, "in-process stack".to_owned())
        }
    };
    let shape = args.inference_url.is_none().then(|| args.shape.name());
    let checks = report::checks(shape, &measured.levels, reference.as_ref());
    println!();
    let model = if measured.model.is_empty() {
        "(default)"
    } else {
        measured.model.as_str()
    };
    println!(
        "lmforge bench serve · {target} · model {model}{} · {arrival} · prompt {} · output {}",
        if shape.is_some() {
            format!(" ({} weights)", args.weights.name())
        } else {
            String::new()
        },
        args.prompt_len,
        args.output_len
    );
    print!("{}", report::table(&measured.levels));
    if let Some(reference) = &reference {
        let ours: BTreeMap<usize, f64> = measured
            .levels
            .iter()
            .map(|l| (l.concurrency, l.output_tokens_per_s))
            .collect();
        println!();
        print!("{}", reference.table(&ours));
    }
    println!();
    print!("{}", report::checks_table(&checks));
    if let Some(path) = &args.json {
        let run = json!({
            "target": target,
            "model": measured.model,
            "shape": shape,
            "weights": shape.map(|_| args.weights.name()),
            "arrival": arrival.to_string(),
            "rate": args.rate,
            "concurrency": args.concurrency,
            "requests": args.requests,
            "duration_s": args.duration.map(|d| d.as_secs_f64()),
            "prompt_len": args.prompt_len.to_string(),
            "output_len": args.output_len.to_string(),
            "text": args.text,
            "temperature": args.temperature,
            "ignore_eos": !args.respect_eos,
            "seed": args.seed,
            "warmup": args.warmup,
            "lmforge_version": env!("CARGO_PKG_VERSION"),
        });
        let document = report::document(run, &measured.levels, reference.as_ref(), &checks);
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(path, serde_json::to_vec_pretty(&document)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    let failed: usize = measured.levels.iter().map(|l| l.failed).sum();
    if failed > 0 {
        bail!("{failed} request(s) failed");
    }
    if args.strict && checks.iter().any(|c| c.passed == Some(false)) {
        bail!("a target check failed");
    }
    Ok(())
}

/// The local run: checkpoint, stack, levels, stack down, then the reference.
async fn local_run(
    args: &ServeArgs,
    arrival: Arrival,
) -> anyhow::Result<(Measured, Option<Reference>)> {
    let shape = args.shape;
    let dir = tempfile::Builder::new()
        .prefix("lmforge-bench-")
        .tempdir()
        .context("creating a temporary checkpoint directory")?;
    eprintln!(
        "writing a random {} checkpoint ({:.1} M parameters) to {}",
        shape.name(),
        shape.config().num_parameters() as f64 / 1e6,
        dir.path().display()
    );
    let path = dir.path().to_owned();
    let seed = args.seed;
    tokio::task::spawn_blocking(move || local::write_checkpoint(&path, shape, seed))
        .await
        .context("the checkpoint writer panicked")??;
    eprintln!("starting the stack on ephemeral ports, importing and loading the model");
    let options = LocalOptions {
        postgres: args.postgres.clone(),
        nats: args.nats.clone(),
        ready_timeout: args.ready_timeout,
        quantization: match args.weights {
            Weights::F32 => pb::Quantization::Unspecified,
            Weights::Q8_0 => pb::Quantization::Q80,
        },
    };
    let name = format!("bench-{}", shape.name());
    let stack = LocalStack::start(options, dir.path(), &name).await?;
    let measured = async {
        let client = crate::generate_cmd::connect(&stack.inference_url).await?;
        measure(args, arrival, client, stack.model_ref.clone()).await
    };
    let measured = tokio::select! {
        measured = measured => measured,
        () = lmforge_runtime::shutdown::signal() => Err(anyhow::anyhow!("interrupted")),
    };
    stack.shutdown().await;
    let measured = measured?;
    let reference = if args.no_reference {
        None
    } else {
        match reference::find_python(args.reference.as_deref()) {
            None => {
                eprintln!(
                    "note: no Python with transformers found (--reference, LMFORGE_BENCH_PYTHON, \
                     .venv-bench or ~/.cache/lmforge-venv); reference skipped"
                );
                None
            }
            Some(python) => {
                eprintln!(
                    "running the transformers reference with {}",
                    python.display()
                );
                let prompt = args.prompt_len.mean().round() as u32;
                let output = args.output_len.mean().round() as u32;
                match reference::run(&python, dir.path(), prompt, output, args.seed).await {
                    Ok(reference) => Some(reference),
                    Err(error) => {
                        eprintln!("note: reference skipped: {error:#}");
                        None
                    }
                }
            }
        }
    };
    Ok((measured, reference))
}

/// Warm-up, then every level in turn.
async fn measure(
    args: &ServeArgs,
    arrival: Arrival,
    client: InferenceServiceClient<Channel>,
    model: String,
) -> anyhow::Result<Measured> {
    let spec = Arc::new(args.spec(model.clone()));
    let run_id = format!("bench-{:x}", std::process::id());
    for index in 0..args.warmup {
        let request = spec.request(!args.seed, index as u64, format!("{run_id}-warmup-{index}"));
        let outcome = load::one_request(client.clone(), request, args.request_timeout).await;
        if let Some(failure) = outcome.failure {
            bail!(
                "warm-up request failed: {}: {}",
                failure.kind,
                failure.message
            );
        }
    }
    let mut levels = Vec::new();
    for (index, &concurrency) in args.concurrency.iter().enumerate() {
        let concurrency = concurrency as usize;
        let plan = LevelPlan {
            concurrency,
            arrival,
            requests: args.requests(concurrency),
            duration: args.duration,
            request_timeout: args.request_timeout,
            // Each level its own prompts, so no level is served from another's prefix cache.
            seed: args.seed ^ ((index as u64 + 1) << 32),
            id_prefix: format!("{run_id}-c{concurrency}"),
        };
        eprintln!(
            "level {concurrency}: {} ({arrival})",
            plan.requests.map_or_else(
                || format!("for {:?}", args.duration.unwrap_or_default()),
                |n| format!("{n} requests"),
            )
        );
        let run = load::run_level(&client, &spec, &plan).await;
        let level = LevelReport::new(concurrency, arrival.to_string(), &run);
        eprintln!(
            "level {concurrency}: {} done, {} failed, {:.1} output tok/s",
            level.completed, level.failed, level.output_tokens_per_s
        );
        levels.push(level);
    }
    Ok(Measured { levels, model })
}
