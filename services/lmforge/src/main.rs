//! `lmforge`: the command line for every lmforge service.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use lmforge::stack::{Stack, StackOptions};
use lmforge_runtime::args::{NatsArgs, PostgresArgs, parse_duration};

#[derive(Debug, clap::Parser)]
#[command(
    name = "lmforge",
    version,
    about = "From a domain dataset to a fine-tuned model served in production"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Run every service in this process, each on its own ports, until Ctrl-C / SIGTERM.
    Up(UpArgs),
    /// Start the stack and run the journey: upload and clean the bundled bank-adviser data,
    /// a base model, a fine-tuning job, alias `production`, answers before and after through
    /// the gateway; then stop (or keep running with --keep-running).
    Demo(DemoArgs),
    /// Registered models, versions and aliases.
    Model {
        /// Address of the registry service.
        #[arg(
            long,
            env = "LMFORGE_REGISTRY_URL",
            default_value = "http://127.0.0.1:50053",
            global = true
        )]
        registry_url: String,
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Generate text with a loaded model, streamed to the terminal as it is sampled.
    Generate(lmforge::generate_cmd::GenerateArgs),
    /// Benchmarks against running services (or a stack started for the purpose).
    Bench {
        #[command(subcommand)]
        command: lmforge::bench_serve::BenchCommand,
    },
    /// Datasets: upload, list, show, report, head.
    Dataset(lmforge::dataset_cmd::DatasetArgs),
    /// Gateway API keys: create, list, revoke.
    Key(lmforge::key_cmd::KeyArgs),
    /// Training jobs: submit, list, get, watch, cancel, logs.
    Job(lmforge::job_cmd::JobArgs),
    /// Ask running servers (gRPC addresses) for their health and services.
    Health {
        /// gRPC addresses, e.g. 127.0.0.1:50053.
        #[arg(required = true)]
        addrs: Vec<SocketAddr>,
    },
}

#[derive(Debug, clap::Subcommand)]
enum ModelCommand {
    /// Register a new model name.
    Create {
        /// Lowercase letters, digits and -_./, at most 128 characters.
        name: String,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List models (optionally those whose name starts with a prefix).
    List {
        /// Name prefix.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Show one model and its versions.
    Show {
        /// Model name.
        name: String,
    },
    /// List the versions of a model, newest first.
    Versions {
        /// Model name.
        name: String,
    },
    /// Search versions across models, e.g. "metrics.eval_loss < 2.1 AND tags.domain = 'bank'".
    Search {
        /// Filter expression (grammar in proto/lmforge/v1/registry.proto).
        #[arg(default_value = "")]
        filter: String,
        /// created_at (default), version, name or metrics.<key>, then ASC or DESC.
        #[arg(long, default_value = "")]
        order_by: String,
        /// At most this many versions.
        #[arg(long, default_value_t = 50)]
        limit: i32,
    },
    /// Point an alias at a version (or delete it with --delete).
    Alias {
        /// Model name.
        name: String,
        /// Alias, e.g. production.
        alias: String,
        /// Target version (omit with --delete).
        version: Option<u32>,
        /// Delete the alias instead.
        #[arg(long)]
        delete: bool,
    },
    /// Register a Hugging Face checkpoint (or PEFT adapter) directory as a new version.
    Import {
        /// Directory with config.json, *.safetensors, tokenizer files.
        dir: std::path::PathBuf,
        /// Model name to add the version to (created when missing).
        #[arg(long)]
        name: String,
        /// For adapters: the base version (`name/3`, `name@production`).
        #[arg(long)]
        parent: Option<String>,
        /// Move this alias to the new version.
        #[arg(long)]
        alias: Option<String>,
    },
    /// Load a version into the inference service (`name@alias` follows alias moves).
    Load(InferenceModel),
    /// Unload a model from the inference service (by the reference it was loaded with).
    Unload(InferenceModel),
    /// Write a version's files (`name@alias`, `name/3`) into a directory.
    Export {
        /// Model reference.
        reference: String,
        /// Target directory (created when missing).
        dir: std::path::PathBuf,
    },
}

/// A model reference on an inference service (`lmforge model load|unload`).
#[derive(Debug, clap::Args)]
struct InferenceModel {
    /// Model reference (`name@production`, `name/3`), as loaded.
    reference: String,
    /// Address of the inference service.
    #[arg(
        long,
        env = "LMFORGE_INFERENCE_URL",
        default_value = "http://127.0.0.1:50054"
    )]
    inference_url: String,
}

#[derive(Debug, clap::Args)]
struct UpArgs {
    #[command(flatten)]
    postgres: PostgresArgs,
    #[command(flatten)]
    nats: NatsArgs,
    /// Bind every port on 127.0.0.1:0 instead of the services' configured addresses.
    #[arg(long)]
    ephemeral: bool,
    /// Prefix every service's Postgres schema (`{prefix}_registry`, …).
    #[arg(long, env = "LMFORGE_SCHEMA_PREFIX")]
    schema_prefix: Option<String>,
    /// How long to wait for every service to report SERVING.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    ready_timeout: Duration,
}

impl UpArgs {
    fn options(&self, force_ephemeral: bool) -> StackOptions {
        StackOptions {
            ephemeral: self.ephemeral || force_ephemeral,
            schema_prefix: self.schema_prefix.clone(),
            ..StackOptions::new(self.postgres.clone(), self.nats.clone())
        }
    }
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    #[command(flatten)]
    up: UpArgs,
    /// The bundled data: `chat.jsonl` and `corpus.txt`.
    #[arg(long, default_value = "examples/bank-adviser")]
    examples: std::path::PathBuf,
    /// A Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json) to
    /// fine-tune instead of a base model trained from scratch on the bundled corpus.
    #[arg(long)]
    base_model: Option<std::path::PathBuf>,
    /// Fine-tuning steps.
    #[arg(long)]
    finetune_steps: Option<u64>,
    /// Keep the stack running after the journey (Ctrl-C to stop) to explore it with the CLI.
    #[arg(long)]
    keep_running: bool,
}

fn main() -> ExitCode {
    let cli = match lmforge_runtime::main_entry::parse_or_exit::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    // Benchmarks run the engines in this process: give them the malloc settings the services
    // use (a foreground run, so Ctrl-C reaches the re-executed child as well).
    if matches!(cli.command, Command::Bench { .. })
        && let Some(code) = lmforge_model::alloc_tuning::reexec_with_tuned_malloc()
    {
        return ExitCode::from(code.clamp(0, 255) as u8);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    // The demo prints its own progress: service logs only when something is wrong, unless
    // LMFORGE_LOG / RUST_LOG asks for more.
    let quiet = matches!(cli.command, Command::Demo(_))
        && std::env::var_os("LMFORGE_LOG").is_none()
        && std::env::var_os("RUST_LOG").is_none();
    let result = runtime.block_on(async move {
        let mut config = lmforge_telemetry::TelemetryConfig::from_env("lmforge")?;
        if quiet {
            config.filter = "warn".to_owned();
        }
        let telemetry = lmforge_telemetry::init_with(config)?;
        let outcome = match cli.command {
            Command::Up(args) => up(args).await,
            Command::Demo(args) => Box::pin(demo(args)).await,
            Command::Health { addrs } => health(addrs).await,
            Command::Dataset(args) => lmforge::dataset_cmd::run(args).await,
            Command::Key(args) => lmforge::key_cmd::run(args).await,
            Command::Job(args) => lmforge::job_cmd::run(args).await,
            Command::Generate(args) => lmforge::generate_cmd::run(args).await,
            Command::Bench { command } => lmforge::bench_serve::run(command).await,
            Command::Model {
                registry_url,
                command,
            } => model(&registry_url, command).await,
        };
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        outcome
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn print_endpoints(stack: &Stack) {
    println!(
        "{:<10} {:<22} {:<28} {:<28} services",
        "service", "grpc", "admin (/metrics, /readyz)", "http"
    );
    for service in &stack.services {
        println!(
            "{:<10} {:<22} {:<28} {:<28} {}",
            service.name,
            service.grpc.to_string(),
            format!("http://{}", service.admin),
            service
                .http
                .map(|h| format!("http://{h}/v1"))
                .unwrap_or_else(|| "-".to_owned()),
            if service.services.is_empty() {
                "(health, reflection)".to_owned()
            } else {
                service.services.join(", ")
            }
        );
    }
}

/// Runs until Ctrl-C / SIGTERM or until a service stops by itself, then stops the stack.
async fn serve_until_stopped(mut stack: Stack) -> anyhow::Result<()> {
    println!("Ctrl-C to stop");
    let stopped = tokio::select! {
        () = lmforge_runtime::shutdown::signal() => None,
        stopped = stack.any_stopped() => Some(stopped),
    };
    if let Some((name, result)) = stopped {
        let reason = result.err().unwrap_or_else(|| "stopped".to_owned());
        stack.shutdown().await.ok();
        anyhow::bail!("{name} stopped unexpectedly: {reason}");
    }
    stack.shutdown().await?;
    println!("lmforge stopped");
    Ok(())
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let mut stack = Stack::start(args.options(false)).await?;
    stack.wait_healthy(args.ready_timeout).await?;
    println!("lmforge is up:");
    print_endpoints(&stack);
    println!("\ntry: grpcurl -plaintext {} list", stack.services[0].grpc);
    serve_until_stopped(stack).await
}

/// Checks every service: health, reflection, `/readyz` and RPC counters on `/metrics`.
async fn check_services(stack: &Stack) -> anyhow::Result<()> {
    for service in &stack.services {
        let listed = lmforge::probe::list_services(service.grpc)
            .await
            .map_err(anyhow::Error::msg)?;
        for expected in &service.services {
            anyhow::ensure!(
                listed.iter().any(|s| s == expected),
                "{} does not advertise {expected}",
                service.name
            );
        }
        let (ready_code, ready_body) = lmforge::probe::admin_get(service.admin, "/readyz")
            .await
            .map_err(anyhow::Error::msg)?;
        let (metrics_code, metrics) = lmforge::probe::admin_get(service.admin, "/metrics")
            .await
            .map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            ready_code == 200,
            "{} /readyz answered {ready_code}: {ready_body}",
            service.name
        );
        anyhow::ensure!(
            metrics_code == 200 && metrics.contains("grpc_server_handled_total"),
            "{} /metrics answered {metrics_code} without RPC counters",
            service.name
        );
    }
    println!(
        "✔ every service is SERVING, lists its API by reflection and exposes /readyz and /metrics"
    );
    Ok(())
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    use lmforge::journey::{Endpoints, Journey, JourneyOptions, random_hex};
    let started = std::time::Instant::now();
    anyhow::ensure!(
        args.examples.join("chat.jsonl").is_file(),
        "--examples: {} has no chat.jsonl (run from the repository root)",
        args.examples.display()
    );
    let admin_key = std::env::var("LMFORGE_GATEWAY_ADMIN_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| format!("lmf_admin_{}", random_hex(20)));
    let mut options = args.up.options(true);
    // The demo's own schemas and work queue, apart from what `lmforge up` serves.
    let prefix = options
        .schema_prefix
        .get_or_insert_with(|| "demo".to_owned());
    println!("starting every lmforge service (lmforge up, schemas {prefix}_*) on ephemeral ports…");
    options.gateway_admin_key = Some(admin_key.clone());
    let mut stack = Stack::start(options).await?;
    let outcome = Box::pin(async {
        stack
            .wait_healthy(args.up.ready_timeout)
            .await
            .context("waiting for the stack")?;
        print_endpoints(&stack);
        check_services(&stack).await?;
        let mut settings = JourneyOptions::demo(args.examples.clone(), admin_key.clone());
        settings.base_model_dir = args.base_model.clone();
        if let Some(steps) = args.finetune_steps {
            settings.finetune_steps = steps;
        }
        let mut journey = Journey::connect(Endpoints::of(&stack)?, settings).await?;
        let leftovers = journey.cancel_leftovers().await?;
        if leftovers > 0 {
            println!("cancelled {leftovers} job(s) left over from an interrupted demo");
        }
        let report = Box::pin(journey.run()).await?;
        anyhow::Ok((report, journey.api_key().map(str::to_owned)))
    })
    .await;
    let (report, api_key) = match outcome {
        Ok(done) => done,
        Err(error) => {
            stack.shutdown().await.ok();
            return Err(error.context("the demo failed"));
        }
    };
    println!(
        "\n✔ journey done in {:.0}s: {}/{} fine-tuned from {}/{} on {}/{}, now {}@production",
        started.elapsed().as_secs_f64(),
        report.tuned.model_name,
        report.tuned.version,
        report.base.model_name,
        report.base.version,
        report.dataset.dataset_name,
        report.dataset.version,
        report.tuned.model_name,
    );
    if args.keep_running {
        println!("\nthe stack keeps running:");
        print_endpoints(&stack);
        println!("gateway admin key: {admin_key}");
        if let Some(key) = api_key {
            println!("API key (Authorization: Bearer …): {key}");
        }
        return serve_until_stopped(stack).await;
    }
    stack.shutdown().await?;
    println!("stack stopped cleanly (run `lmforge demo --keep-running` to explore it)");
    Ok(())
}

async fn health(addrs: Vec<SocketAddr>) -> anyhow::Result<()> {
    let mut failed = false;
    for addr in addrs {
        match lmforge::probe::health(addr).await {
            Ok(status) => {
                let services = lmforge::probe::list_services(addr)
                    .await
                    .unwrap_or_else(|e| vec![format!("(reflection failed: {e})")]);
                println!("{addr}: {status:?} — {}", services.join(", "));
                failed |= status != tonic_health::pb::health_check_response::ServingStatus::Serving;
            }
            Err(error) => {
                println!("{addr}: unreachable ({error})");
                failed = true;
            }
        }
    }
    anyhow::ensure!(!failed, "not every server is SERVING");
    Ok(())
}

async fn model(registry_url: &str, command: ModelCommand) -> anyhow::Result<()> {
    use lmforge::model_cmd;
    use lmforge_proto::v1 as pb;
    // Inference-side commands need no registry connection.
    if let ModelCommand::Load(target) | ModelCommand::Unload(target) = &command {
        let load = matches!(command, ModelCommand::Load(_));
        return model_cmd::load_or_unload(&target.inference_url, &target.reference, load).await;
    }
    let mut client = model_cmd::connect(registry_url).await?;
    let status = model_cmd::status_error;
    match command {
        ModelCommand::Create { name, description } => {
            let model = client
                .create_model(pb::CreateModelRequest {
                    name,
                    description,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner();
            println!("created model {}", model.name);
        }
        ModelCommand::List { prefix } => {
            let filter = if prefix.is_empty() {
                String::new()
            } else {
                format!("name LIKE '{}%'", prefix.replace('\'', "''"))
            };
            let mut token = String::new();
            let mut models = Vec::new();
            loop {
                let page = client
                    .list_models(pb::ListRegisteredModelsRequest {
                        page_size: 200,
                        page_token: token,
                        filter: filter.clone(),
                        order_by: String::new(),
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                models.extend(page.models);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            model_cmd::print_models(&models);
        }
        ModelCommand::Show { name } | ModelCommand::Versions { name } => {
            let found = client
                .get_model(pb::GetModelRequest { name: name.clone() })
                .await
                .map_err(status)?
                .into_inner();
            model_cmd::print_models(std::slice::from_ref(&found));
            println!();
            let versions = client
                .list_model_versions(pb::ListModelVersionsRequest {
                    model_name: name,
                    page_size: 1000,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner()
                .versions;
            model_cmd::print_versions(&versions);
        }
        ModelCommand::Search {
            filter,
            order_by,
            limit,
        } => {
            let versions = client
                .search_model_versions(pb::SearchModelVersionsRequest {
                    filter,
                    order_by,
                    page_size: limit,
                    ..Default::default()
                })
                .await
                .map_err(status)?
                .into_inner()
                .versions;
            model_cmd::print_versions(&versions);
        }
        ModelCommand::Alias {
            name,
            alias,
            version,
            delete,
        } => {
            if delete {
                let actor = format!("user:{}", std::env::var("USER").unwrap_or_default());
                client
                    .delete_alias(pb::DeleteAliasRequest {
                        model_name: name.clone(),
                        alias: alias.clone(),
                        actor,
                        ..Default::default()
                    })
                    .await
                    .map_err(status)?;
                println!("deleted {name}@{alias}");
            } else {
                let version = version.context("give the target version, or --delete")?;
                set_alias(&mut client, &name, &alias, version).await?;
            }
        }
        ModelCommand::Import {
            dir,
            name,
            parent,
            alias,
        } => {
            let version =
                model_cmd::import(&mut client, &dir, &name, parent.as_deref(), true).await?;
            println!(
                "registered {}/{} ({} files, digest {})",
                version.model_name,
                version.version,
                version.files.len(),
                version.digest
            );
            if let Some(alias) = alias {
                set_alias(&mut client, &name, &alias, version.version).await?;
            }
        }
        ModelCommand::Load(_) | ModelCommand::Unload(_) => {
            // Answered above, before connecting to the registry.
        }
        ModelCommand::Export { reference, dir } => {
            let version = model_cmd::export(&mut client, &reference, &dir, true).await?;
            println!(
                "wrote {}/{} ({} files) to {}",
                version.model_name,
                version.version,
                version.files.len(),
                dir.display()
            );
        }
    }
    Ok(())
}

/// Moves `name@alias` to `version` as the current user and prints the move.
async fn set_alias(
    client: &mut lmforge_proto::v1::registry_service_client::RegistryServiceClient<
        tonic::transport::Channel,
    >,
    name: &str,
    alias: &str,
    version: u32,
) -> anyhow::Result<()> {
    let moved = client
        .set_alias(lmforge_proto::v1::SetAliasRequest {
            model_name: name.to_owned(),
            alias: alias.to_owned(),
            version,
            actor: format!("user:{}", std::env::var("USER").unwrap_or_default()),
            ..Default::default()
        })
        .await
        .map_err(lmforge::model_cmd::status_error)?
        .into_inner();
    match moved.previous_version {
        Some(previous) => println!("{name}@{alias}: {previous} → {version}"),
        None => println!("{name}@{alias} → {version}"),
    }
    Ok(())
}
