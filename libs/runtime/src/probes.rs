//! Dependency probes: each named check runs every few seconds and its result goes into a
//! [`Readiness`], which `/readyz` reads and which [`crate::server::ServiceHost`] mirrors
//! into `grpc.health.v1` (NOT_SERVING while any dependency is down).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use lmforge_telemetry::admin::Readiness;
use tokio::sync::watch;

type ProbeFn = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The checks a service runs against its dependencies.
#[derive(Clone, Default)]
pub struct Probes {
    checks: Vec<(String, ProbeFn)>,
    interval: Option<Duration>,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Probes")
            .field("checks", &self.names())
            .finish()
    }
}

/// Default time between two rounds of probes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);

/// The longest one probe may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

impl Probes {
    /// No checks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a named check.
    pub fn with<F, Fut>(mut self, name: &str, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks
            .push((name.to_owned(), Arc::new(move || Box::pin(check()))));
        self
    }

    /// Checks Postgres with `SELECT 1`.
    pub fn with_postgres(self, pool: sqlx::PgPool) -> Self {
        self.with("postgres", move || {
            let pool = pool.clone();
            async move { crate::postgres::probe(&pool).await }
        })
    }

    /// Checks the NATS connection and JetStream.
    pub fn with_nats(self, client: async_nats::Client) -> Self {
        self.with("nats", move || {
            let client = client.clone();
            async move { crate::nats::probe(&client).await }
        })
    }

    /// Checks another lmforge service through its `grpc.health.v1` endpoint.
    pub fn with_grpc_health(self, name: &str, endpoint: tonic::transport::Endpoint) -> Self {
        let channel = endpoint.connect_lazy();
        self.with(name, move || {
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            async move {
                let response = client
                    .check(tonic_health::pb::HealthCheckRequest::default())
                    .await
                    .map_err(|status| format!("{}: {}", status.code(), status.message()))?;
                let serving = tonic_health::pb::health_check_response::ServingStatus::Serving;
                if response.into_inner().status == serving as i32 {
                    Ok(())
                } else {
                    Err("not serving".to_owned())
                }
            }
        })
    }

    /// Overrides [`DEFAULT_INTERVAL`].
    pub fn every(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// The dependency names, in the order they were added.
    pub fn names(&self) -> Vec<String> {
        self.checks.iter().map(|(name, _)| name.clone()).collect()
    }

    /// A readiness tracker with one entry per check, all "not checked yet".
    pub fn readiness(&self) -> Readiness {
        Readiness::new(self.names())
    }

    /// Runs every check now, then again each interval, until `stop_rx` turns true.
    pub async fn run(self, readiness: Readiness, mut stop_rx: watch::Receiver<bool>) {
        let interval = self.interval.unwrap_or(DEFAULT_INTERVAL);
        loop {
            let rounds = self.checks.iter().map(|(name, check)| {
                let readiness = readiness.clone();
                async move {
                    let result = match tokio::time::timeout(PROBE_TIMEOUT, check()).await {
                        Ok(result) => result,
                        Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs())),
                    };
                    readiness.set(name, result);
                }
            });
            futures::future::join_all(rounds).await;
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                _ = stop_rx.wait_for(|stop| *stop) => return,
            }
        }
    }
}
