//! The whole stack in one process, as `lmforge up` runs it: every service reports SERVING
//! once Postgres and NATS answer, advertises its API through reflection, and exposes
//! readiness and metrics on its admin port; shutdown stops every one cleanly.

use std::time::Duration;

use lmforge::probe;
use lmforge::stack::Stack;
use lmforge_e2e::{drop_schemas, stack_options, unique_name};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_health_reflection_and_metrics() {
    let prefix = unique_name("stack");
    let mut stack = Stack::start(stack_options(&prefix))
        .await
        .expect("every port binds");
    stack
        .wait_healthy(Duration::from_secs(60))
        .await
        .expect("every service reports SERVING (run `make services` if Postgres/NATS are down)");

    let names: Vec<&str> = stack.services.iter().map(|s| s.name).collect();
    assert_eq!(
        names,
        [
            "ingest",
            "registry",
            "jobs",
            "trainer",
            "inference",
            "gateway"
        ]
    );
    for service in &stack.services {
        let listed = probe::list_services(service.grpc)
            .await
            .unwrap_or_else(|e| panic!("{}: reflection: {e}", service.name));
        let mut expected: Vec<String> = service.services.iter().map(|s| s.to_string()).collect();
        expected.extend(
            [
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            ]
            .map(String::from),
        );
        expected.sort();
        assert_eq!(
            listed, expected,
            "{} advertises exactly its services",
            service.name
        );

        let (code, body) = probe::admin_get(service.admin, "/readyz")
            .await
            .expect("admin answers");
        assert_eq!(code, 200, "{} ready: {body}", service.name);
        assert!(!body.contains("down"), "{}: {body}", service.name);
        let (code, _) = probe::admin_get(service.admin, "/healthz")
            .await
            .expect("admin answers");
        assert_eq!(code, 200);
        let (code, metrics) = probe::admin_get(service.admin, "/metrics")
            .await
            .expect("admin answers");
        assert_eq!(code, 200);
        assert!(
            metrics.contains("grpc_server_handled_total{")
                && metrics.contains("grpc_method=\"ServerReflectionInfo\""),
            "{} counts RPCs by method:\n{metrics}",
            service.name
        );
    }

    // A method whose issue has not landed answers UNIMPLEMENTED, and is counted as such.
    let registry = &stack.services[1];
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", registry.grpc))
        .expect("valid")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "lmforge.v1.RegistryService".to_owned(),
        })
        .await
        .expect("per-service health")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let unknown = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "lmforge.v1.NoSuchService".to_owned(),
        })
        .await
        .expect_err("unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    stack.shutdown().await.expect("every service stops cleanly");
    drop_schemas(&prefix).await;
}
