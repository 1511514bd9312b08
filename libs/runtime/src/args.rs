//! Flags shared by several services, flattened into each service's clap `Config`. Every
//! flag also reads an `LMFORGE_*` env var; defaults match what `make services` starts.

use std::time::Duration;

use tonic::transport::Endpoint;

use crate::StartupError;
use crate::postgres::PgSettings;

/// Where `make services` puts Postgres when nothing else is configured.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:55432/lmforge";
/// Where `make services` puts NATS when nothing else is configured.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:54222";

/// Parses `10s`, `500ms`, `2m`, … for duration flags.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value).map_err(|e| format!("{e} (examples: 500ms, 10s, 2m)"))
}

/// Parses a peer service address (`http://127.0.0.1:50053`) for gRPC client flags.
pub fn parse_endpoint(value: &str) -> Result<Endpoint, String> {
    let uri: http::Uri = value
        .parse()
        .map_err(|e| format!("`{value}` is not a URL: {e}"))?;
    match (uri.scheme_str(), uri.authority()) {
        (Some("http" | "https"), Some(_)) => {}
        _ => return Err(format!("`{value}` must look like http://host:port")),
    }
    Endpoint::from_shared(value.to_owned()).map_err(|e| format!("`{value}`: {e}"))
}

/// Postgres connection flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PostgresArgs {
    /// Postgres URL; the service keeps its tables in its own schema there.
    #[arg(long, env = "LMFORGE_DATABASE_URL", default_value = DEFAULT_DATABASE_URL)]
    pub database_url: String,
    /// Size of the connection pool.
    #[arg(long, env = "LMFORGE_DATABASE_MAX_CONNECTIONS", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub database_max_connections: u32,
}

impl PostgresArgs {
    /// Checks the URL and schema name without connecting.
    pub fn validate(&self, schema: &str) -> Result<(), StartupError> {
        crate::postgres::parse_url(&self.database_url)?;
        crate::postgres::validate_schema(schema)
    }

    /// Connects to `schema` (created when missing), waiting up to `startup_timeout`.
    pub async fn connect(
        &self,
        schema: &str,
        startup_timeout: Duration,
    ) -> Result<sqlx::PgPool, StartupError> {
        crate::postgres::connect(&PgSettings {
            url: self.database_url.clone(),
            schema: schema.to_owned(),
            max_connections: self.database_max_connections,
            startup_timeout,
        })
        .await
    }
}

/// NATS connection flags.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsArgs {
    /// NATS server URL (JetStream enabled); several comma-separated for a cluster.
    #[arg(long, env = "LMFORGE_NATS_URL", default_value = DEFAULT_NATS_URL)]
    pub nats_url: String,
}

impl NatsArgs {
    /// Checks the URL without connecting.
    pub fn validate(&self) -> Result<(), StartupError> {
        crate::nats::validate_url(&self.nats_url)
    }

    /// Connects as `client_name`, waiting up to `startup_timeout`.
    pub async fn connect(
        &self,
        client_name: &str,
        startup_timeout: Duration,
    ) -> Result<async_nats::Client, StartupError> {
        crate::nats::connect(&self.nats_url, client_name, startup_timeout).await
    }
}

/// Start-up and shutdown timing flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LifecycleArgs {
    /// How long start-up waits for Postgres/NATS before giving up.
    #[arg(long, env = "LMFORGE_STARTUP_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub startup_timeout: Duration,
    /// How long shutdown lets in-flight calls finish before closing them.
    #[arg(long, env = "LMFORGE_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// How often dependencies are probed for readiness (`/readyz`, gRPC health).
    #[arg(long, env = "LMFORGE_PROBE_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub probe_interval: Duration,
}

/// An artifact store URL (`LMFORGE_ARTIFACTS`), with a plain or relative directory made an
/// absolute `file://` URL.
pub fn artifacts_url(value: &str) -> Result<String, StartupError> {
    let value = value.trim();
    if value.contains("://") {
        return Ok(value.to_owned());
    }
    let path = std::path::Path::new(value);
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| StartupError::Invalid {
                setting: "LMFORGE_ARTIFACTS",
                reason: format!("cannot resolve `{value}`: {e}"),
            })?
            .join(path)
    };
    Ok(format!("file://{}", absolute.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_need_scheme_and_host() {
        assert!(parse_endpoint("http://127.0.0.1:50053").is_ok());
        assert!(parse_endpoint("127.0.0.1:50053").is_err());
        assert!(parse_endpoint("ftp://x:1").is_err());
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert!(parse_duration("ten seconds").is_err());
    }
}
