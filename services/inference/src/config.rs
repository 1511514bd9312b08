//! Configuration of the inference service.

use std::net::SocketAddr;

use lmforge_runtime::args::{LifecycleArgs, parse_endpoint};
use lmforge_runtime::main_entry::ServiceConfig;
use lmforge_runtime::{Listeners, StartupError};
use tonic::transport::Endpoint;

/// Flags and env vars of `lmforge-inference`.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "lmforge-inference",
    version,
    about = "lmforge inference service"
)]
pub struct Config {
    /// gRPC listen address.
    #[arg(
        long,
        env = "LMFORGE_INFERENCE_LISTEN",
        default_value = "127.0.0.1:50054"
    )]
    pub listen: SocketAddr,
    /// Admin HTTP listen address (/metrics, /healthz, /readyz).
    #[arg(
        long,
        env = "LMFORGE_INFERENCE_ADMIN_LISTEN",
        default_value = "127.0.0.1:9104"
    )]
    pub admin_listen: SocketAddr,
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
        Ok(())
    }

    async fn bind(&self) -> Result<Listeners, StartupError> {
        Listeners::bind(
            (self.listen, "LMFORGE_INFERENCE_LISTEN"),
            (self.admin_listen, "LMFORGE_INFERENCE_ADMIN_LISTEN"),
        )
        .await
    }
}
