//! The whole lmforge stack in one process: every service bound first (so each knows its
//! peers' addresses), then started on the same runtime, each on its own ports.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use lmforge_runtime::args::{NatsArgs, PostgresArgs};
use lmforge_runtime::{Listeners, StartupError};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Endpoint;

/// How to start the stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Postgres for ingest, jobs, registry and gateway.
    pub postgres: PostgresArgs,
    /// NATS for jobs and the trainer.
    pub nats: NatsArgs,
    /// Bind every port on `127.0.0.1:0` instead of each service's configured address.
    pub ephemeral: bool,
    /// Prefix for every service's Postgres schema (`{prefix}_registry`), so that several
    /// stacks can share one database (tests). `None` keeps the configured schemas.
    pub schema_prefix: Option<String>,
    /// How often dependencies are probed.
    pub probe_interval: Duration,
    /// The gateway's bootstrap admin key; `None` keeps `LMFORGE_GATEWAY_ADMIN_KEY`.
    pub gateway_admin_key: Option<String>,
    /// Artifact store of ingest, registry and trainer; `None` keeps `LMFORGE_ARTIFACTS`.
    pub artifacts: Option<String>,
    /// Run a trainer worker in the process (false: workers run elsewhere, e.g. as
    /// `lmforge-trainer` processes sharing the stack's NATS stream).
    pub trainer: bool,
    /// How long the work queue waits for a silent worker; `None` keeps `LMFORGE_JOBS_ACK_WAIT`.
    pub jobs_ack_wait: Option<Duration>,
}

impl StackOptions {
    /// Every service on its configured ports, schemas and settings (env vars and defaults).
    pub fn new(postgres: PostgresArgs, nats: NatsArgs) -> Self {
        Self {
            postgres,
            nats,
            ephemeral: false,
            schema_prefix: None,
            probe_interval: Duration::from_secs(2),
            gateway_admin_key: None,
            artifacts: None,
            trainer: true,
            jobs_ack_wait: None,
        }
    }
}

/// One service of a running stack.
#[derive(Debug)]
pub struct RunningService {
    /// `ingest`, `jobs`, …
    pub name: &'static str,
    /// Its gRPC address.
    pub grpc: SocketAddr,
    /// Its admin HTTP address.
    pub admin: SocketAddr,
    /// Its public HTTP address (the gateway's OpenAI API), if it has one.
    pub http: Option<SocketAddr>,
    /// The fully qualified gRPC services it serves besides health and reflection.
    pub services: Vec<&'static str>,
    task: JoinHandle<Result<(), StartupError>>,
}

/// A running stack; [`Stack::shutdown`] stops every service and waits for them.
#[derive(Debug)]
pub struct Stack {
    /// In start order: ingest, registry, jobs, trainer, inference, gateway.
    pub services: Vec<RunningService>,
    /// The work queue's NATS subject prefix and stream (for workers started elsewhere).
    pub jobs_queue: (String, String),
    stop_tx: watch::Sender<bool>,
}

/// Why the stack could not start or stopped badly.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// A service could not start.
    #[error("{service}: {error}")]
    Service {
        /// Which one.
        service: &'static str,
        /// Why.
        error: StartupError,
    },
    /// A service is not healthy in time.
    #[error("{service} not healthy within {waited_secs}s: {reason}")]
    NotHealthy {
        /// Which one.
        service: &'static str,
        /// How long we waited.
        waited_secs: u64,
        /// The last thing seen.
        reason: String,
    },
    /// A service task panicked or was cancelled.
    #[error("{service}: task failed: {reason}")]
    Task {
        /// Which one.
        service: &'static str,
        /// Why.
        reason: String,
    },
}

fn endpoint(addr: SocketAddr) -> Endpoint {
    Endpoint::from_shared(format!("http://{addr}")).expect("a socket address makes a valid URI")
}

/// Builds a service config from env vars and defaults, as its own binary would.
fn defaults<C: clap::Parser>(binary: &str) -> Result<C, StackError> {
    C::try_parse_from([binary]).map_err(|e| StackError::Service {
        service: "config",
        error: StartupError::Invalid {
            setting: "environment",
            reason: e
                .render()
                .to_string()
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
        },
    })
}

async fn listeners(
    ephemeral: bool,
    grpc: SocketAddr,
    admin: SocketAddr,
    service: &'static str,
) -> Result<Listeners, StackError> {
    let bound = if ephemeral {
        Listeners::ephemeral().await
    } else {
        Listeners::bind(
            (grpc, "grpc listen address"),
            (admin, "admin listen address"),
        )
        .await
    };
    bound.map_err(|error| StackError::Service { service, error })
}

fn launch<F>(
    name: &'static str,
    (grpc, admin): (SocketAddr, SocketAddr),
    services: Vec<&'static str>,
    serve: F,
) -> RunningService
where
    F: Future<Output = Result<(), StartupError>> + Send + 'static,
{
    RunningService {
        name,
        grpc,
        admin,
        http: None,
        services,
        task: tokio::spawn(serve),
    }
}

impl Stack {
    /// Binds and starts every service. Returns once all are spawned; use
    /// [`Stack::wait_healthy`] to wait until they serve.
    pub async fn start(options: StackOptions) -> Result<Self, StackError> {
        use lmforge_proto::v1::{
            dataset_service_server, gateway_admin_service_server, inference_service_server,
            job_service_server, open_ai_service_server, registry_service_server,
        };
        let schema = |name: &str| match &options.schema_prefix {
            Some(prefix) => format!("{prefix}_{name}"),
            None => name.to_owned(),
        };
        let (stop_tx, stop_rx) = watch::channel(false);
        let shutdown = move || {
            let mut stop_rx = stop_rx.clone();
            async move {
                let _ = stop_rx.wait_for(|stop| *stop).await;
            }
        };
        let mut services = Vec::new();

        let mut ingest: lmforge_ingest::Config = defaults("lmforge-ingest")?;
        ingest.postgres = options.postgres.clone();
        ingest.schema = schema("ingest");
        ingest.lifecycle.probe_interval = options.probe_interval;
        if let Some(artifacts) = &options.artifacts {
            ingest.artifacts = artifacts.clone();
        }
        // Ingest is bound first but launched once the registry (tokenizers) and inference
        // (rewrites) addresses it calls are known; it stays first in `services`.
        let ingest_bound = listeners(
            options.ephemeral,
            ingest.listen,
            ingest.admin_listen,
            "ingest",
        )
        .await?;

        let mut registry: lmforge_registry::Config = defaults("lmforge-registry")?;
        registry.postgres = options.postgres.clone();
        registry.schema = schema("registry");
        registry.lifecycle.probe_interval = options.probe_interval;
        if let Some(artifacts) = &options.artifacts {
            registry.artifacts = artifacts.clone();
        }
        let bound = listeners(
            options.ephemeral,
            registry.listen,
            registry.admin_listen,
            "registry",
        )
        .await?;
        let registry_url = endpoint(bound.grpc_addr());
        ingest.registry_url = registry_url.clone();
        services.push(launch(
            "registry",
            (bound.grpc_addr(), bound.admin_addr()),
            vec![registry_service_server::SERVICE_NAME],
            lmforge_registry::serve(registry, bound, shutdown()),
        ));

        let mut jobs: lmforge_jobs::Config = defaults("lmforge-jobs")?;
        jobs.postgres = options.postgres.clone();
        jobs.nats = options.nats.clone();
        jobs.schema = schema("jobs");
        jobs.lifecycle.probe_interval = options.probe_interval;
        jobs.registry_url = registry_url.clone();
        jobs.ingest_url = endpoint(ingest_bound.grpc_addr());
        // A stack with its own schemas also gets its own work queue.
        if let Some(prefix) = &options.schema_prefix {
            jobs.subject_prefix = format!("{prefix}.jobs");
            jobs.stream = format!("{}_JOBS", prefix.to_uppercase());
        }
        if let Some(ack_wait) = options.jobs_ack_wait {
            jobs.ack_wait = ack_wait;
        }
        let (subject_prefix, stream) = (jobs.subject_prefix.clone(), jobs.stream.clone());
        let bound = listeners(options.ephemeral, jobs.listen, jobs.admin_listen, "jobs").await?;
        services.push(launch(
            "jobs",
            (bound.grpc_addr(), bound.admin_addr()),
            vec![job_service_server::SERVICE_NAME],
            lmforge_jobs::serve(jobs, bound, shutdown()),
        ));

        let jobs_queue = (subject_prefix, stream);
        if options.trainer {
            let mut trainer: lmforge_trainer::Config = defaults("lmforge-trainer")?;
            trainer.nats = options.nats.clone();
            trainer.registry_url = registry_url.clone();
            trainer.ingest_url = endpoint(ingest_bound.grpc_addr());
            trainer.subject_prefix = jobs_queue.0.clone();
            trainer.stream = jobs_queue.1.clone();
            trainer.lifecycle.probe_interval = options.probe_interval;
            if let Some(artifacts) = &options.artifacts {
                trainer.artifacts = artifacts.clone();
            }
            let bound = listeners(
                options.ephemeral,
                trainer.listen,
                trainer.admin_listen,
                "trainer",
            )
            .await?;
            services.push(launch(
                "trainer",
                (bound.grpc_addr(), bound.admin_addr()),
                vec![],
                lmforge_trainer::serve(trainer, bound, shutdown()),
            ));
        }

        let mut inference: lmforge_inference::Config = defaults("lmforge-inference")?;
        inference.registry_url = registry_url;
        inference.lifecycle.probe_interval = options.probe_interval;
        let bound = listeners(
            options.ephemeral,
            inference.listen,
            inference.admin_listen,
            "inference",
        )
        .await?;
        let inference_url = endpoint(bound.grpc_addr());
        ingest.inference_url = inference_url.clone();
        services.push(launch(
            "inference",
            (bound.grpc_addr(), bound.admin_addr()),
            vec![inference_service_server::SERVICE_NAME],
            lmforge_inference::serve(inference, bound, shutdown()),
        ));
        services.insert(
            0,
            launch(
                "ingest",
                (ingest_bound.grpc_addr(), ingest_bound.admin_addr()),
                vec![dataset_service_server::SERVICE_NAME],
                lmforge_ingest::serve(ingest, ingest_bound, shutdown()),
            ),
        );

        let mut gateway: lmforge_gateway::Config = defaults("lmforge-gateway")?;
        gateway.postgres = options.postgres.clone();
        gateway.schema = schema("gateway");
        gateway.inference_url = inference_url;
        gateway.lifecycle.probe_interval = options.probe_interval;
        if options.ephemeral {
            gateway.http_listen = ([127, 0, 0, 1], 0).into();
        }
        if let Some(key) = &options.gateway_admin_key {
            gateway.admin_key = Some(key.clone());
        }
        let http =
            lmforge_runtime::listeners::bind(gateway.http_listen, "LMFORGE_GATEWAY_HTTP_LISTEN")
                .await
                .map_err(|error| StackError::Service {
                    service: "gateway",
                    error,
                })?;
        let http_addr = lmforge_runtime::listeners::local_addr(&http);
        let bound = listeners(
            options.ephemeral,
            gateway.listen,
            gateway.admin_listen,
            "gateway",
        )
        .await?;
        let mut gateway_service = launch(
            "gateway",
            (bound.grpc_addr(), bound.admin_addr()),
            vec![
                open_ai_service_server::SERVICE_NAME,
                gateway_admin_service_server::SERVICE_NAME,
            ],
            lmforge_gateway::serve_with_http(gateway, bound, http, shutdown()),
        );
        gateway_service.http = Some(http_addr);
        services.push(gateway_service);

        Ok(Self {
            services,
            jobs_queue,
            stop_tx,
        })
    }

    /// The running service called `name`.
    pub fn service(&self, name: &str) -> Option<&RunningService> {
        self.services.iter().find(|s| s.name == name)
    }

    /// Waits until every service's gRPC health says SERVING, failing early when a service
    /// stops (its start-up error is returned) or when `timeout` passes.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<(), StackError> {
        let deadline = tokio::time::Instant::now() + timeout;
        for index in 0..self.services.len() {
            let (name, addr) = (self.services[index].name, self.services[index].grpc);
            let watch = crate::probe::wait_serving(addr);
            tokio::pin!(watch);
            let outcome = tokio::select! {
                result = tokio::time::timeout_at(deadline, &mut watch) => match result {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(reason)) => Err(reason),
                    Err(_) => Err("still NOT_SERVING (is a dependency down? see its /readyz)".to_owned()),
                },
                ended = &mut self.services[index].task => {
                    return Err(match ended {
                        Ok(Err(error)) => StackError::Service { service: name, error },
                        Ok(Ok(())) => StackError::Task { service: name, reason: "stopped before serving".to_owned() },
                        Err(join) => StackError::Task { service: name, reason: join.to_string() },
                    });
                }
            };
            outcome.map_err(|reason| StackError::NotHealthy {
                service: name,
                waited_secs: timeout.as_secs(),
                reason,
            })?;
        }
        Ok(())
    }

    /// Resolves when any service stops by itself (an error while serving), with its name.
    pub async fn any_stopped(&mut self) -> (&'static str, Result<(), String>) {
        let tasks = self
            .services
            .iter_mut()
            .map(|service| {
                let name = service.name;
                Box::pin(async move {
                    let result = match (&mut service.task).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(error)) => Err(error.to_string()),
                        Err(join) => Err(join.to_string()),
                    };
                    (name, result)
                })
            })
            .collect::<Vec<_>>();
        futures::future::select_all(tasks).await.0
    }

    /// Signals every service to drain and stop, and waits for all of them.
    pub async fn shutdown(self) -> Result<(), StackError> {
        let _ = self.stop_tx.send(true);
        let mut first_error = None;
        for service in self.services {
            let result = match service.task.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(StackError::Service {
                    service: service.name,
                    error,
                }),
                Err(join) => Err(StackError::Task {
                    service: service.name,
                    reason: join.to_string(),
                }),
            };
            if let Err(error) = result {
                tracing::error!(%error, "service stopped with an error");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
