//! Helpers shared by the end-to-end tests: where Postgres and NATS are (from the env that
//! `make test` exports), unique names so that tests run in parallel, and a TCP proxy that a
//! test can cut to simulate a dependency going down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use lmforge_runtime::args::{DEFAULT_DATABASE_URL, DEFAULT_NATS_URL};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
pub use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The Postgres URL `make test` exports, or the `make services` default.
pub fn database_url() -> String {
    std::env::var("LMFORGE_DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// The NATS URL `make test` exports, or the `make services` default.
pub fn nats_url() -> String {
    std::env::var("LMFORGE_NATS_URL").unwrap_or_else(|_| DEFAULT_NATS_URL.to_owned())
}

/// A stack for a test: every port ephemeral, every schema under `prefix`, dependencies
/// probed every 200 ms, Postgres and NATS from the environment `make test` exports.
pub fn stack_options(prefix: &str) -> lmforge::stack::StackOptions {
    lmforge::stack::StackOptions {
        ephemeral: true,
        schema_prefix: Some(prefix.to_owned()),
        probe_interval: std::time::Duration::from_millis(200),
        ..lmforge::stack::StackOptions::new(
            lmforge_runtime::args::PostgresArgs {
                database_url: database_url(),
                database_max_connections: 4,
            },
            lmforge_runtime::args::NatsArgs {
                nats_url: nats_url(),
            },
        )
    }
}

/// A name no other test (in this or a parallel process) uses: `t{pid}_{n}_{label}`, a
/// valid Postgres schema prefix.
pub fn unique_name(label: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}_{}_{label}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Drops every schema whose name starts with `prefix`, cleaning up after a test.
pub async fn drop_schemas(prefix: &str) {
    let Ok(pool) = sqlx::PgPool::connect(&database_url()).await else {
        return;
    };
    let schemas: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)")
            .bind(prefix)
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
    for schema in schemas {
        let _ = sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .execute(&pool)
            .await;
    }
}

/// Forwards TCP connections to `target` while up; [`TcpProxy::cut`] closes every open
/// connection and refuses new ones, [`TcpProxy::restore`] lets them through again.
#[derive(Debug)]
pub struct TcpProxy {
    /// Where clients should connect.
    pub addr: SocketAddr,
    up_tx: watch::Sender<bool>,
}

impl TcpProxy {
    /// Starts forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("bound");
        let (up_tx, up_rx) = watch::channel(true);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !*up_rx.borrow() {
                    drop(inbound);
                    continue;
                }
                let mut up_rx = up_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = up_rx.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Self { addr, up_tx }
    }

    /// Simulates an outage.
    pub fn cut(&self) {
        let _ = self.up_tx.send(false);
    }

    /// Ends the outage.
    pub fn restore(&self) {
        let _ = self.up_tx.send(true);
    }
}

/// An OTLP/gRPC trace collector on an ephemeral port that keeps every span it receives with
/// its resource's `service.name`, so a test can check what the services exported.
#[derive(Debug, Clone)]
pub struct OtlpCollector {
    /// `http://127.0.0.1:port`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub endpoint: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<(String, Span)>>>,
}

#[tonic::async_trait]
impl TraceService for OtlpCollector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut kept = self.spans.lock().expect("collector lock");
        for resource_spans in request.into_inner().resource_spans {
            let service_name = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| match v {
                    Value::StringValue(s) => s.clone(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    kept.push((service_name.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl OtlpCollector {
    /// Starts the collector.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let collector = Self {
            endpoint: format!("http://{}", listener.local_addr().expect("bound")),
            spans: Default::default(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(collector.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        collector
    }

    /// `service: span name` of every span received so far (for failure messages).
    pub fn summary(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .spans
            .lock()
            .expect("collector lock")
            .iter()
            .map(|(service, span)| format!("{service}: {}", span.name))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Every span of trace `trace_id` (hex) received so far, with its service name.
    pub fn trace(&self, trace_id: &str) -> Vec<(String, Span)> {
        self.spans
            .lock()
            .expect("collector lock")
            .iter()
            .filter(|(_, span)| hex::encode(&span.trace_id) == trace_id)
            .cloned()
            .collect()
    }

    /// The trace id (hex) of the first span received that `matches` (service name, span).
    pub fn trace_of(&self, matches: impl Fn(&str, &Span) -> bool) -> Option<String> {
        self.spans
            .lock()
            .expect("collector lock")
            .iter()
            .find(|(service, span)| matches(service, span))
            .map(|(_, span)| hex::encode(&span.trace_id))
    }
}

/// The string value of a span attribute.
pub fn attribute(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .map(|v| match v {
            Value::StringValue(s) => s.clone(),
            Value::IntValue(i) => i.to_string(),
            other => format!("{other:?}"),
        })
}
