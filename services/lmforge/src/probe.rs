//! Asking a running lmforge server about itself over gRPC: health (`grpc.health.v1`) and the
//! services it serves (`grpc.reflection.v1`), and its admin port over HTTP.

use std::net::SocketAddr;

use futures::StreamExt;
use tonic::transport::Endpoint;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

fn channel(addr: SocketAddr) -> tonic::transport::Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address makes a valid URI")
        .connect_lazy()
}

/// The overall health status (`""` service) of the server at `addr`.
pub async fn health(addr: SocketAddr) -> Result<ServingStatus, String> {
    let response = HealthClient::new(channel(addr))
        .check(HealthCheckRequest::default())
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
    ServingStatus::try_from(response.into_inner().status).map_err(|e| e.to_string())
}

/// Resolves once the server at `addr` reports SERVING, following `Health/Watch` (no polling).
pub async fn wait_serving(addr: SocketAddr) -> Result<(), String> {
    let mut client = HealthClient::new(channel(addr));
    let mut stream = client
        .watch(HealthCheckRequest::default())
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    while let Some(update) = stream.next().await {
        let update = update.map_err(|s| format!("{}: {}", s.code(), s.message()))?;
        if update.status == ServingStatus::Serving as i32 {
            return Ok(());
        }
    }
    Err("health stream ended before SERVING".to_owned())
}

/// The gRPC services the server at `addr` advertises through reflection, sorted.
pub async fn list_services(addr: SocketAddr) -> Result<Vec<String>, String> {
    let mut client = ServerReflectionClient::new(channel(addr));
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let response = responses
        .next()
        .await
        .ok_or("reflection answered nothing")?
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            Ok(names)
        }
        other => Err(format!("unexpected reflection answer: {other:?}")),
    }
}

/// GETs `path` on the admin port at `addr`: (status code, body).
pub async fn admin_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let response = reqwest::get(format!("http://{addr}{path}"))
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response.text().await.map_err(|e| e.to_string())?;
    Ok((status, body))
}
