//! Health follows the dependencies: a service whose Postgres goes away reports NOT_SERVING
//! (gRPC health and `/readyz`) and SERVING again once it is back, without restarting.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use lmforge::probe;
use lmforge_e2e::{TcpProxy, database_url, drop_schemas, unique_name};
use lmforge_runtime::Listeners;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn postgres_addr(url: &str) -> SocketAddr {
    let rest = url.split_once('@').map_or(url, |(_, r)| r);
    let rest = rest
        .trim_start_matches("postgres://")
        .trim_start_matches("postgresql://");
    let host_port = rest.split('/').next().expect("url has a host");
    let (host, port) = host_port.rsplit_once(':').unwrap_or((host_port, "5432"));
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    format!("{host}:{port}")
        .parse()
        .expect("the test database is on an IP address")
}

/// A proxy in front of the test Postgres, and the database URL that goes through it.
async fn postgres_through_proxy() -> (TcpProxy, String) {
    let url = database_url();
    let target = postgres_addr(&url);
    let proxy = TcpProxy::start(target).await;
    let proxied = url
        .replacen(
            &format!(":{}/", target.port()),
            &format!(":{}/", proxy.addr.port()),
            1,
        )
        .replace("localhost", "127.0.0.1");
    (proxy, proxied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_tracks_postgres_going_down_and_back() {
    let (proxy, proxied) = postgres_through_proxy().await;
    let schema = unique_name("ingest");
    let mut config = lmforge_ingest::Config::try_parse_from(["lmforge-ingest"]).expect("defaults");
    config.postgres.database_url = proxied;
    config.schema = schema.clone();
    config.lifecycle.probe_interval = Duration::from_millis(100);
    let listeners = Listeners::ephemeral().await.expect("bind");
    let (grpc, admin) = (listeners.grpc_addr(), listeners.admin_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(lmforge_ingest::serve(config, listeners, async {
        let _ = stop_rx.await;
    }));

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
        .expect("valid")
        .connect_lazy();
    let updates = HealthClient::new(channel)
        .watch(HealthCheckRequest::default())
        .await
        .expect("watch health")
        .into_inner();
    // An open Watch stream would hold the server's graceful drain: keep it in a scope.
    {
        let mut updates = updates;
        let mut next_status = async || -> ServingStatus {
            let update = tokio::time::timeout(Duration::from_secs(30), updates.next())
                .await
                .expect("a health change within 30s")
                .expect("stream open")
                .expect("status");
            ServingStatus::try_from(update.status).expect("known status")
        };
        let mut wait_for = async |wanted: ServingStatus| {
            while next_status().await != wanted {}
        };

        wait_for(ServingStatus::Serving).await;
        assert_eq!(
            probe::admin_get(admin, "/readyz").await.expect("admin").0,
            200
        );

        proxy.cut();
        wait_for(ServingStatus::NotServing).await;
        let (code, body) = probe::admin_get(admin, "/readyz").await.expect("admin");
        assert_eq!(code, 503);
        assert!(body.starts_with("postgres: down"), "{body}");
        // Alive all the same: a liveness probe must not restart it for its dependency.
        let liveness = HealthClient::new(
            tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))
                .expect("valid")
                .connect_lazy(),
        )
        .check(HealthCheckRequest {
            service: lmforge_runtime::server::LIVENESS_SERVICE.to_owned(),
        })
        .await
        .expect("liveness check")
        .into_inner();
        assert_eq!(liveness.status, ServingStatus::Serving as i32);

        proxy.restore();
        wait_for(ServingStatus::Serving).await;
        assert_eq!(
            probe::admin_get(admin, "/readyz").await.expect("admin").0,
            200
        );
    }

    let _ = stop_tx.send(());
    service.await.expect("task").expect("clean stop");
    drop_schemas(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_answers_unavailable_while_postgres_is_down_and_recovers() {
    use lmforge_proto::v1 as pb;
    let (proxy, proxied) = postgres_through_proxy().await;
    let schema = unique_name("registry");
    let artifacts = tempfile::tempdir().expect("temp dir");
    let mut config =
        lmforge_registry::Config::try_parse_from(["lmforge-registry"]).expect("defaults");
    config.postgres.database_url = proxied;
    config.schema = schema.clone();
    config.artifacts = artifacts.path().display().to_string();
    let listeners = Listeners::ephemeral().await.expect("bind");
    let grpc = listeners.grpc_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(lmforge_registry::serve(config, listeners, async {
        let _ = stop_rx.await;
    }));
    probe::wait_serving(grpc).await.expect("serves");
    let mut client =
        pb::registry_service_client::RegistryServiceClient::connect(format!("http://{grpc}"))
            .await
            .expect("connect");
    let get = pb::GetModelRequest {
        name: "absent".into(),
    };
    assert_eq!(
        client
            .get_model(get.clone())
            .await
            .expect_err("absent")
            .code(),
        tonic::Code::NotFound
    );

    proxy.cut();
    let started = std::time::Instant::now();
    let status = client
        .get_model(get.clone())
        .await
        .expect_err("database down");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered promptly, not a hang"
    );
    assert!(
        !status.message().contains("SELECT"),
        "no SQL leaks: {status:?}"
    );

    proxy.restore();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client.get_model(get.clone()).await {
            Err(status) if status.code() == tonic::Code::NotFound => break,
            other => {
                assert!(std::time::Instant::now() < deadline, "recovers: {other:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let _ = stop_tx.send(());
    service.await.expect("task").expect("clean stop");
    drop_schemas(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_tracks_nats_going_down_and_back() {
    let nats = lmforge_e2e::nats_url();
    let target: SocketAddr = nats
        .trim_start_matches("nats://")
        .replace("localhost", "127.0.0.1")
        .parse()
        .expect("the test NATS is on an IP address");
    let proxy = TcpProxy::start(target).await;
    let schema = unique_name("jobs");
    let mut config = lmforge_jobs::Config::try_parse_from(["lmforge-jobs"]).expect("defaults");
    config.postgres.database_url = database_url();
    config.nats.nats_url = format!("nats://{}", proxy.addr);
    config.schema = schema.clone();
    config.lifecycle.probe_interval = Duration::from_millis(100);
    let listeners = Listeners::ephemeral().await.expect("bind");
    let (grpc, admin) = (listeners.grpc_addr(), listeners.admin_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(lmforge_jobs::serve(config, listeners, async {
        let _ = stop_rx.await;
    }));
    probe::wait_serving(grpc).await.expect("serves");

    proxy.cut();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = probe::admin_get(admin, "/readyz").await.expect("admin");
        if code == 503 {
            assert!(body.contains("nats: down"), "{body}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        probe::health(grpc).await.expect("health answers"),
        ServingStatus::NotServing
    );

    proxy.restore();
    tokio::time::timeout(Duration::from_secs(30), probe::wait_serving(grpc))
        .await
        .expect("SERVING again once NATS is back (the client reconnects)")
        .expect("health stream");

    let _ = stop_tx.send(());
    service.await.expect("task").expect("clean stop");
    drop_schemas(&schema).await;
}
