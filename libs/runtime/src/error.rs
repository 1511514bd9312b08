//! Start-up and serving errors, each naming the setting that caused it so that a service
//! binary can exit with one clear line.

/// Why a service could not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A listen address could not be bound (in use, not local, no permission).
    #[error("{setting}: cannot listen on {addr}: {io}")]
    Bind {
        /// The flag / env var naming the address.
        setting: &'static str,
        /// The address asked for.
        addr: String,
        /// Why binding failed.
        io: std::io::Error,
    },
    /// A setting's value is malformed.
    #[error("{setting}: {reason}")]
    Invalid {
        /// The flag / env var.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A dependency did not answer within the start-up timeout.
    #[error("{setting}: {target} did not answer within {waited_secs}s: {reason}")]
    Unreachable {
        /// The flag / env var naming the dependency.
        setting: &'static str,
        /// The dependency's address, with any password removed.
        target: String,
        /// How long we tried.
        waited_secs: u64,
        /// The last error seen.
        reason: String,
    },
    /// Schema migrations failed.
    #[error("migrating schema `{schema}`: {reason}")]
    Migrate {
        /// The service's Postgres schema.
        schema: String,
        /// Why.
        reason: String,
    },
    /// The gRPC or admin server failed while serving.
    #[error("{server} server: {reason}")]
    Serve {
        /// Which server (`grpc`, `admin`, `http`).
        server: &'static str,
        /// Why.
        reason: String,
    },
    /// Telemetry could not be set up.
    #[error(transparent)]
    Telemetry(#[from] lmforge_telemetry::TelemetryError),
}
