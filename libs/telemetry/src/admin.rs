//! The admin HTTP port every service exposes: `/metrics` (Prometheus text), `/healthz`
//! (liveness: the process answers) and `/readyz` (readiness: every dependency answers,
//! per [`Readiness`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Shared view of whether each dependency (Postgres, NATS, …) currently answers.
/// Starts with every named dependency "not checked yet", i.e. not ready.
#[derive(Debug, Clone)]
pub struct Readiness {
    state_tx: Arc<watch::Sender<BTreeMap<String, Result<(), String>>>>,
}

impl Readiness {
    /// Tracks the named dependencies; a service with none is ready at once.
    pub fn new<I, S>(dependencies: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let state = dependencies
            .into_iter()
            .map(|name| (name.into(), Err("not checked yet".to_owned())))
            .collect();
        let (state_tx, _) = watch::channel(state);
        Self {
            state_tx: Arc::new(state_tx),
        }
    }

    /// Records the latest probe of one dependency; notifies watchers only on change.
    pub fn set(&self, dependency: &str, result: Result<(), String>) {
        self.state_tx.send_if_modified(|state| {
            let entry = state.entry(dependency.to_owned()).or_insert(Ok(()));
            if *entry == result {
                return false;
            }
            match (&result, entry.is_ok()) {
                (Ok(()), _) => tracing::info!(dependency, "dependency is up"),
                // Was up: a real outage.
                (Err(reason), true) => tracing::warn!(dependency, %reason, "dependency is down"),
                // Not up yet (start-up, or still down): not worth a warning each change.
                (Err(reason), false) => tracing::info!(dependency, %reason, "dependency not ready"),
            }
            *entry = result;
            true
        });
    }

    /// True when every dependency answered its latest probe.
    pub fn is_ready(&self) -> bool {
        self.state_tx.borrow().values().all(Result::is_ok)
    }

    /// One line per dependency: `postgres: ok` or `nats: down (connection refused)`.
    pub fn report(&self) -> String {
        let state = self.state_tx.borrow();
        if state.is_empty() {
            return "no dependencies\n".to_owned();
        }
        state
            .iter()
            .map(|(name, result)| match result {
                Ok(()) => format!("{name}: ok\n"),
                Err(reason) => format!("{name}: down ({reason})\n"),
            })
            .collect()
    }

    /// A receiver that wakes on every change, for whoever mirrors readiness elsewhere
    /// (the gRPC health service).
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<String, Result<(), String>>> {
        self.state_tx.subscribe()
    }
}

/// The admin router: `/metrics`, `/healthz`, `/readyz`.
pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(|| async { crate::metrics::render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(readiness)
}

async fn readyz(State(readiness): State<Readiness>) -> (StatusCode, String) {
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, readiness.report())
}

/// Serves the admin router on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::metrics::install_recorder();
    axum::serve(listener, router(readiness))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_dependency() {
        let readiness = Readiness::new(["postgres", "nats"]);
        assert!(!readiness.is_ready());
        readiness.set("postgres", Ok(()));
        assert!(!readiness.is_ready());
        readiness.set("nats", Ok(()));
        assert!(readiness.is_ready());
        readiness.set("nats", Err("connection refused".into()));
        assert!(!readiness.is_ready());
        assert_eq!(
            readiness.report(),
            "nats: down (connection refused)\npostgres: ok\n"
        );
        assert!(Readiness::new(Vec::<String>::new()).is_ready());
    }
}
