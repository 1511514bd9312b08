//! The official `openai` Python package against a real stack in this process: registry,
//! inference serving a tiny random-init model, and the gateway on ephemeral ports. The
//! checks themselves are in `scripts/gateway/openai_client_test.py`; the package lives in
//! `.venv-gateway` (`make gateway-venv`, a prerequisite of `make test`).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use common::{TestGateway, database_url, drop_schema, unique_schema};
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::inference_service_client::InferenceServiceClient;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use lmforge_runtime::Listeners;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

async fn wait_serving(addr: std::net::SocketAddr) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("url")
            .connect()
            .await
            && tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await
                .is_ok_and(|r| r.into_inner().status == 1)
        {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{addr} never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_unchanged() {
    let python = repo_root().join(".venv-gateway/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make test` or `make gateway-venv` (creates .venv-gateway with the openai package)",
        python.display()
    );

    // Registry and inference, the tiny model registered and loaded.
    let registry_schema = unique_schema("sdk_registry");
    let artifacts = tempfile::tempdir().expect("temp dir");
    let cache = tempfile::tempdir().expect("temp dir");
    let mut rc = lmforge_registry::Config::try_parse_from(["lmforge-registry"]).expect("defaults");
    rc.postgres.database_url = database_url();
    rc.schema = registry_schema.clone();
    rc.artifacts = artifacts.path().display().to_string();
    let rl = Listeners::ephemeral().await.expect("bind");
    let registry_addr = rl.grpc_addr();
    let (rtx, rrx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(lmforge_registry::serve(rc, rl, async {
        let _ = rrx.await;
    }));
    wait_serving(registry_addr).await;
    let mut registry = RegistryServiceClient::connect(format!("http://{registry_addr}"))
        .await
        .expect("registry");
    lmforge_registry_client::upload::register_dir(
        &mut registry,
        &repo_root().join("libs/model/fixtures/tiny-llama"),
        pb::CreateModelVersionRequest {
            model_name: "acme/tiny".into(),
            create_model_if_missing: true,
            ..Default::default()
        },
        std::sync::Arc::new(|_: &str, _: u64, _: u64| {}),
    )
    .await
    .expect("register the tiny model");

    let mut ic =
        lmforge_inference::Config::try_parse_from(["lmforge-inference"]).expect("defaults");
    ic.registry_url = format!("http://{registry_addr}").parse().expect("url");
    ic.cache_dir = cache.path().to_path_buf();
    ic.kv_blocks = Some(256);
    ic.block_size = 4;
    let il = Listeners::ephemeral().await.expect("bind");
    let inference_addr = il.grpc_addr();
    let (itx, irx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(lmforge_inference::serve(ic, il, async {
        let _ = irx.await;
    }));
    wait_serving(inference_addr).await;
    let loaded = InferenceServiceClient::connect(format!("http://{inference_addr}"))
        .await
        .expect("inference")
        .load_model(pb::LoadModelRequest {
            model_ref: "acme/tiny@latest".into(),
            ..Default::default()
        })
        .await
        .expect("load")
        .into_inner();
    assert_eq!(loaded.state, pb::LoadedModelState::Ready as i32);

    let routing =
        "models:\n  - name: tiny\n    targets: [\"acme/tiny@latest\"]\n    context_length: 64\n";
    let gw = TestGateway::start_with("sdk", inference_addr, routing, |c| c.max_tokens = 64).await;
    let (_, key) = gw.key("sdk", &[], 0, 0).await;
    let (_, limited) = gw.key("sdk-limited", &[], 1, 0).await;
    // A second gateway whose inference is down (nothing listens there).
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dead = closed.local_addr().expect("addr");
    drop(closed);
    let down = TestGateway::start("sdk_down", dead, routing).await;

    let script = repo_root().join("scripts/gateway/openai_client_test.py");
    let output = tokio::process::Command::new(&python)
        .arg(&script)
        .args(["--base-url", &format!("{}/v1", gw.http)])
        .args(["--api-key", &key])
        .args(["--limited-key", &limited])
        .args(["--down-base-url", &format!("{}/v1", down.http)])
        .args(["--down-api-key", &down.admin_key])
        .output()
        .await
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "openai_client_test.py failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("checks passed"), "{stdout}");

    gw.stop().await;
    down.stop().await;
    let _ = itx.send(());
    let _ = rtx.send(());
    drop_schema(&registry_schema).await;
}
