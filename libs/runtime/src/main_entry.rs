//! The whole of a service binary's `main`: parse flags and `LMFORGE_*` env vars, set up
//! telemetry, bind the ports, serve until SIGTERM/Ctrl-C, flush spans. Any failure is one
//! `error: …` line naming the setting, and a non-zero exit code; never a panic.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use futures::future::BoxFuture;

use crate::StartupError;

/// A service's typed configuration, as `main` needs it.
pub trait ServiceConfig: clap::Parser + Send + 'static {
    /// The service name (`registry`), used for telemetry and messages.
    const NAME: &'static str;
    /// What [`ServiceConfig::bind`] produces and `serve` takes.
    type Listeners: Send + 'static;
    /// Checks settings that clap cannot (URLs, names) before anything starts.
    fn validate(&self) -> Result<(), StartupError>;
    /// Binds every port the service listens on.
    fn bind(&self) -> impl Future<Output = Result<Self::Listeners, StartupError>> + Send;
}

/// Parses flags, failing with clap's first line (`error: unexpected argument '--x' found`)
/// plus a hint, exit code 2. `--help`/`--version` print and exit 0.
pub fn parse_or_exit<C: clap::Parser>() -> Result<C, ExitCode> {
    match C::try_parse() {
        Ok(config) => Ok(config),
        Err(error) => {
            use clap::error::ErrorKind;
            if matches!(
                error.kind(),
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
            ) {
                let _ = error.print();
                return Err(ExitCode::SUCCESS);
            }
            let rendered = error.render().to_string();
            let first = rendered
                .lines()
                .next()
                .unwrap_or("error: invalid arguments");
            eprintln!("{first} (see --help)");
            Err(ExitCode::from(2))
        }
    }
}

/// Runs a service binary: `serve(config, listeners, shutdown)` until a signal.
pub fn run<C, F, Fut, E>(serve: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, C::Listeners, BoxFuture<'static, ()>) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let config = match parse_or_exit::<C>() {
        Ok(config) => config,
        Err(code) => return code,
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!(
                "error: {}: cannot start the async runtime: {error}",
                C::NAME
            );
            return ExitCode::FAILURE;
        }
    };
    let result: Result<(), String> = runtime.block_on(async move {
        config.validate().map_err(|e| e.to_string())?;
        let telemetry = lmforge_telemetry::init(C::NAME).map_err(|e| e.to_string())?;
        let outcome = async {
            let listeners = config.bind().await.map_err(|e| e.to_string())?;
            serve(config, listeners, Box::pin(crate::shutdown::signal()))
                .await
                .map_err(|e| e.to_string())
        }
        .await;
        // Flushing blocks on the exporter: keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        outcome
    });
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {}: {message}", C::NAME);
            ExitCode::FAILURE
        }
    }
}
