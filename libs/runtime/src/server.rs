//! Assembling and running a service's servers.
//!
//! [`grpc_server`] is the tonic builder every service starts from: a `grpc.server` span per
//! request parented to the caller's trace, and per-RPC metrics. [`ServiceHost`] adds health
//! and reflection, runs the dependency probes and the admin port, and serves until the
//! shutdown future resolves, then drains in-flight calls for at most a bounded time.

use std::future::Future;
use std::time::Duration;

use lmforge_telemetry::admin::Readiness;
use lmforge_telemetry::metrics::GrpcMetricsLayer;
use tokio::sync::watch;
use tonic::transport::Server;
use tonic::transport::server::Router;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::layer::util::{Identity, Stack};

use crate::probes::Probes;
use crate::{Listeners, StartupError};

/// The tonic server builder with lmforge's tracing and metrics layers.
pub type GrpcServer = Server<Stack<GrpcMetricsLayer, Identity>>;

/// A router built from [`grpc_server`].
pub type GrpcRouter = Router<Stack<GrpcMetricsLayer, Identity>>;

/// How long shutdown waits for in-flight calls (open streams included) before dropping them.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// The gRPC health service name that is SERVING for as long as the process serves, whatever
/// its dependencies do: what a liveness probe asks (`grpc: {port, service: lmforge.liveness}`),
/// so an outage of Postgres or NATS takes replicas out of rotation (readiness, service `""`)
/// without restarting them all.
pub const LIVENESS_SERVICE: &str = "lmforge.liveness";
const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// The gRPC server builder every lmforge service uses; `server` labels its metrics.
pub fn grpc_server(server: &'static str) -> GrpcServer {
    Server::builder()
        .trace_fn(lmforge_telemetry::propagation::server_span)
        .layer(GrpcMetricsLayer::new(server))
}

/// Health, reflection, probes and the admin port of one service.
pub struct ServiceHost {
    name: &'static str,
    services: Vec<&'static str>,
    probes: Probes,
    readiness: Readiness,
    reporter: HealthReporter,
    drain_timeout: Duration,
}

impl std::fmt::Debug for ServiceHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceHost")
            .field("name", &self.name)
            .field("services", &self.services)
            .field("probes", &self.probes)
            .finish()
    }
}

impl ServiceHost {
    /// `name` is the lmforge service (`registry`); `services` the fully qualified gRPC
    /// services it serves (`lmforge.v1.RegistryService`), advertised by reflection and
    /// given their own health status.
    pub fn new(name: &'static str, services: &[&'static str], probes: Probes) -> Self {
        let readiness = probes.readiness();
        let reporter = HealthReporter::new();
        Self {
            name,
            services: services.to_vec(),
            probes,
            readiness,
            reporter,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }

    /// Overrides [`DEFAULT_DRAIN_TIMEOUT`].
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// The readiness this host reports.
    pub fn readiness(&self) -> Readiness {
        self.readiness.clone()
    }

    /// Starts the router with health and reflection (v1 and v1alpha, for older grpcurl).
    pub fn router(&self, server: &mut GrpcServer) -> Result<GrpcRouter, StartupError> {
        let health = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(self.reporter.clone()),
        );
        let mut v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(lmforge_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        let mut v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(lmforge_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
        for service in
            self.services
                .iter()
                .copied()
                .chain([HEALTH_SERVICE, REFLECTION_V1, REFLECTION_V1ALPHA])
        {
            v1 = v1.with_service_name(service);
            v1alpha = v1alpha.with_service_name(service);
        }
        let reflection_error = |e: tonic_reflection::server::Error| StartupError::Invalid {
            setting: "reflection descriptors",
            reason: e.to_string(),
        };
        Ok(server
            .add_service(health)
            .add_service(v1.build_v1().map_err(reflection_error)?)
            .add_service(v1alpha.build_v1alpha().map_err(reflection_error)?))
    }

    async fn set_health(&self, status: ServingStatus) {
        self.reporter.set_service_status("", status).await;
        for service in &self.services {
            self.reporter.set_service_status(*service, status).await;
        }
    }

    /// Serves `router` on `listeners.grpc` and the admin port on `listeners.admin` until
    /// `shutdown` resolves; health is NOT_SERVING until every probe passes, and again as
    /// soon as shutdown starts.
    pub async fn run(
        self,
        router: GrpcRouter,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), StartupError> {
        let grpc_addr = listeners.grpc_addr();
        let admin_addr = listeners.admin_addr();
        let (stop_tx, stop_rx) = watch::channel(false);
        self.set_health(ServingStatus::NotServing).await;
        self.reporter
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;

        let probes = tokio::spawn(
            self.probes
                .clone()
                .run(self.readiness.clone(), stop_rx.clone()),
        );
        let mirror = tokio::spawn(mirror_health(
            self.readiness.clone(),
            self.reporter.clone(),
            self.services.clone(),
            stop_rx.clone(),
        ));
        let mut admin_stop = stop_rx.clone();
        let admin = tokio::spawn(lmforge_telemetry::admin::serve(
            listeners.admin,
            self.readiness.clone(),
            async move {
                let _ = admin_stop.wait_for(|stop| *stop).await;
            },
        ));
        tracing::info!(service = self.name, grpc = %grpc_addr, admin = %admin_addr, "serving");

        let mut grpc_stop = stop_rx.clone();
        // TCP_NODELAY: without it small unary replies wait on Nagle + delayed ACK (~40 ms).
        let incoming =
            tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true));
        let grpc = router.serve_with_incoming_shutdown(incoming, async move {
            let _ = grpc_stop.wait_for(|stop| *stop).await;
        });
        tokio::pin!(grpc);
        let served = tokio::select! {
            result = &mut grpc => result.map_err(|e| StartupError::Serve { server: "grpc", reason: e.to_string() }),
            () = shutdown => {
                tracing::info!(service = self.name, "shutting down: draining in-flight calls");
                // Stop the health mirror first so that it cannot flip back to SERVING.
                let _ = stop_tx.send(true);
                self.set_health(ServingStatus::NotServing).await;
                match tokio::time::timeout(self.drain_timeout, &mut grpc).await {
                    Ok(result) => result.map_err(|e| StartupError::Serve { server: "grpc", reason: e.to_string() }),
                    Err(_) => {
                        tracing::warn!(service = self.name, timeout_secs = self.drain_timeout.as_secs(), "drain timed out, closing remaining calls");
                        Ok(())
                    }
                }
            }
        };
        let _ = stop_tx.send(true);
        let _ = probes.await;
        let _ = mirror.await;
        match admin.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "admin server stopped with an error"),
            Err(error) => tracing::warn!(%error, "admin server task failed"),
        }
        tracing::info!(service = self.name, "stopped");
        served
    }
}

/// Keeps `grpc.health.v1` in step with readiness until stopped.
async fn mirror_health(
    readiness: Readiness,
    reporter: HealthReporter,
    services: Vec<&'static str>,
    mut stop_rx: watch::Receiver<bool>,
) {
    let mut changes = readiness.subscribe();
    loop {
        let status = if readiness.is_ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if *stop_rx.borrow() {
            return;
        }
        reporter.set_service_status("", status).await;
        for service in &services {
            reporter.set_service_status(*service, status).await;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = stop_rx.wait_for(|stop| *stop) => return,
        }
    }
}
