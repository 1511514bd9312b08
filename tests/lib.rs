//! Helpers shared by the end-to-end tests: where Postgres and NATS are (from the env that
//! `make test` exports), unique names so that tests run in parallel, and a TCP proxy that a
//! test can cut to simulate a dependency going down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use lmforge_runtime::args::{DEFAULT_DATABASE_URL, DEFAULT_NATS_URL};
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

pub use lmforge_telemetry::testing::{OtlpCollector, Span, attribute};
