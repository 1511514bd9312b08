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
    /// Start the stack, check every service (health, reflection, admin port), print the
    /// endpoints and stop.
    Demo(UpArgs),
    /// Ask running servers (gRPC addresses) for their health and services.
    Health {
        /// gRPC addresses, e.g. 127.0.0.1:50053.
        #[arg(required = true)]
        addrs: Vec<SocketAddr>,
    },
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
            postgres: self.postgres.clone(),
            nats: self.nats.clone(),
            ephemeral: self.ephemeral || force_ephemeral,
            schema_prefix: self.schema_prefix.clone(),
            probe_interval: Duration::from_secs(2),
        }
    }
}

fn main() -> ExitCode {
    let cli = match lmforge_runtime::main_entry::parse_or_exit::<Cli>() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
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
    let result = runtime.block_on(async move {
        let telemetry = lmforge_telemetry::init("lmforge")?;
        let outcome = match cli.command {
            Command::Up(args) => up(args).await,
            Command::Demo(args) => demo(args).await,
            Command::Health { addrs } => health(addrs).await,
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
        "{:<10} {:<22} {:<22} services",
        "service", "grpc", "admin (http)"
    );
    for service in &stack.services {
        println!(
            "{:<10} {:<22} {:<22} {}",
            service.name,
            service.grpc.to_string(),
            format!("http://{}", service.admin),
            if service.services.is_empty() {
                "(health, reflection)".to_owned()
            } else {
                service.services.join(", ")
            }
        );
    }
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let mut stack = Stack::start(args.options(false)).await?;
    stack.wait_healthy(args.ready_timeout).await?;
    println!("lmforge is up:");
    print_endpoints(&stack);
    println!("\ntry: grpcurl -plaintext {} list", stack.services[0].grpc);
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

async fn demo(args: UpArgs) -> anyhow::Result<()> {
    println!("starting every lmforge service on ephemeral ports…");
    let mut stack = Stack::start(args.options(true)).await?;
    stack
        .wait_healthy(args.ready_timeout)
        .await
        .context("waiting for the stack")?;
    print_endpoints(&stack);
    println!();
    for service in &stack.services {
        let status = lmforge::probe::health(service.grpc)
            .await
            .map_err(anyhow::Error::msg)?;
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
        println!(
            "✔ {:<10} health {:?}, reflection lists {} services, /readyz: {}",
            service.name,
            status,
            listed.len(),
            ready_body.trim().replace('\n', ", ")
        );
    }
    stack.shutdown().await?;
    println!("\nevery service answered; stack stopped cleanly");
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
