//! Configuration of the trainer service.

use std::net::SocketAddr;

use lmforge_runtime::args::{LifecycleArgs, NatsArgs, parse_endpoint};
use lmforge_runtime::main_entry::ServiceConfig;
use lmforge_runtime::{Listeners, StartupError};
use tonic::transport::Endpoint;

/// Flags and env vars of `lmforge-trainer`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "lmforge-trainer", version, about = "lmforge trainer worker")]
pub struct Config {
    /// gRPC listen address.
    #[arg(
        long,
        env = "LMFORGE_TRAINER_LISTEN",
        default_value = "127.0.0.1:50056"
    )]
    pub listen: SocketAddr,
    /// Admin HTTP listen address (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "LMFORGE_TRAINER_ADMIN_LISTEN",
        default_value = "127.0.0.1:9106"
    )]
    pub admin_listen: SocketAddr,
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Address of the registry service.
    #[arg(long, env = "LMFORGE_REGISTRY_URL", default_value = "http://127.0.0.1:50053", value_parser = parse_endpoint)]
    pub registry_url: Endpoint,
    #[command(flatten)]
    pub lifecycle: LifecycleArgs,
}

impl ServiceConfig for Config {
    const NAME: &'static str = crate::NAME;
    type Listeners = Listeners;

    fn validate(&self) -> Result<(), StartupError> {
        self.nats.validate()
    }

    async fn bind(&self) -> Result<Listeners, StartupError> {
        Listeners::bind(
            (self.listen, "LMFORGE_TRAINER_LISTEN"),
            (self.admin_listen, "LMFORGE_TRAINER_ADMIN_LISTEN"),
        )
        .await
    }
}
