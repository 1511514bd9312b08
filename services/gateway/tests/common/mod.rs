//! Shared by the gateway's integration tests: a gateway on ephemeral ports in its own Postgres
//! schema, API keys made through the admin API, and a scripted inference service whose
//! answers, delays, failures and stream chunking a test chooses.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use futures::Stream;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::gateway_admin_service_client::GatewayAdminServiceClient;
use lmforge_proto::v1::inference_service_server::{InferenceService, InferenceServiceServer};
use lmforge_runtime::Listeners;
use tonic::{Request, Response, Status};

/// The Postgres URL `make test` exports, or the `make services` default.
pub fn database_url() -> String {
    std::env::var("LMFORGE_DATABASE_URL")
        .unwrap_or_else(|_| lmforge_runtime::args::DEFAULT_DATABASE_URL.to_owned())
}

/// A schema name no other test uses.
pub fn unique_schema(label: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "t{}_{}_gw_{label}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Drops a test's schema.
pub async fn drop_schema(schema: &str) {
    if let Ok(pool) = sqlx::PgPool::connect(&database_url()).await {
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
            .execute(&pool)
            .await;
    }
}

/// How the scripted inference answers one model reference.
#[derive(Debug, Clone)]
pub struct Script {
    /// The reply text (split into these chunks when streamed).
    pub chunks: Vec<String>,
    /// Delay before answering.
    pub delay: Duration,
    /// Answer with this status instead.
    pub fail: Option<tonic::Code>,
}

impl Script {
    pub fn text(text: &str) -> Self {
        Self {
            chunks: vec![text.to_owned()],
            delay: Duration::ZERO,
            fail: None,
        }
    }

    pub fn chunks(chunks: &[&str]) -> Self {
        Self {
            chunks: chunks.iter().map(|c| (*c).to_owned()).collect(),
            delay: Duration::ZERO,
            fail: None,
        }
    }

    pub fn failing(code: tonic::Code) -> Self {
        Self {
            fail: Some(code),
            ..Self::text("")
        }
    }
}

/// A scripted inference service: a model ref's script, or the echo of the request (every
/// message as `role: content` lines) when it has none.
#[derive(Debug, Clone, Default)]
pub struct MockInference {
    pub scripts: Arc<Mutex<HashMap<String, Script>>>,
    /// Generate + GenerateStream calls.
    pub calls: Arc<AtomicUsize>,
    /// Model refs asked for, in order.
    pub models_seen: Arc<Mutex<Vec<String>>>,
    /// The last request.
    pub last: Arc<Mutex<Option<pb::GenerateRequest>>>,
    /// The `traceparent` metadata of each Generate + GenerateStream call, in order.
    pub traceparents: Arc<Mutex<Vec<Option<String>>>>,
}

fn render(input: &Option<pb::generate_request::Input>) -> String {
    match input {
        Some(pb::generate_request::Input::Prompt(p)) => p.clone(),
        Some(pb::generate_request::Input::Chat(chat)) => chat
            .messages
            .iter()
            .map(|m| format!("{}: {}", m.role, m.content))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn resolved(model: &str) -> pb::ResolvedModel {
    pb::ResolvedModel {
        name: model.split('@').next().unwrap_or_default().to_owned(),
        version: 1,
        digest: "ab".repeat(32),
        requested_ref: model.to_owned(),
    }
}

impl MockInference {
    pub fn script(&self, model: &str, script: Script) {
        self.scripts
            .lock()
            .expect("scripts")
            .insert(model.to_owned(), script);
    }

    /// Starts serving on an ephemeral port.
    pub async fn start(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let service = InferenceServiceServer::new(self.clone());
        // TCP_NODELAY as the real services set it (small stream frames must not wait on
        // Nagle and delayed ACKs).
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming),
        );
        addr
    }

    fn record_traceparent<T>(&self, request: &Request<T>) {
        let traceparent = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        self.traceparents
            .lock()
            .expect("traceparents")
            .push(traceparent);
    }

    async fn prepare(&self, request: &pb::GenerateRequest) -> Result<(Vec<String>, u32), Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.models_seen
            .lock()
            .expect("seen")
            .push(request.model.clone());
        *self.last.lock().expect("last") = Some(request.clone());
        let script = self
            .scripts
            .lock()
            .expect("scripts")
            .get(&request.model)
            .cloned();
        let script = script.unwrap_or_else(|| Script::text(&render(&request.input)));
        tokio::time::sleep(script.delay).await;
        if let Some(code) = script.fail {
            return Err(Status::new(code, "scripted failure"));
        }
        let n = request.sampling.as_ref().and_then(|s| s.n).unwrap_or(1);
        Ok((script.chunks, n))
    }
}

#[tonic::async_trait]
impl InferenceService for MockInference {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        self.record_traceparent(&request);
        let request = request.into_inner();
        let (chunks, n) = self.prepare(&request).await?;
        let text: String = chunks.concat();
        let tokens = text.split_whitespace().count() as u32;
        Ok(Response::new(pb::GenerateResponse {
            request_id: request.request_id,
            model: Some(resolved(&request.model)),
            choices: (0..n)
                .map(|index| pb::GenerationChoice {
                    index,
                    text: text.clone(),
                    finish_reason: pb::FinishReason::Stop as i32,
                    ..Default::default()
                })
                .collect(),
            usage: Some(pb::Usage {
                prompt_tokens: 5,
                completion_tokens: tokens * n,
                total_tokens: 5 + tokens * n,
                cached_prompt_tokens: 0,
            }),
            ..Default::default()
        }))
    }

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<pb::GenerateStreamResponse, Status>> + Send>>>,
        Status,
    > {
        self.record_traceparent(&request);
        let request = request.into_inner();
        let (chunks, n) = self.prepare(&request).await?;
        let mut messages = Vec::new();
        let mut first = true;
        for index in 0..n {
            for (i, chunk) in chunks.iter().enumerate() {
                let last = i + 1 == chunks.len();
                messages.push(Ok(pb::GenerateStreamResponse {
                    request_id: request.request_id.clone(),
                    index,
                    text: chunk.clone(),
                    tokens: vec![pb::TokenInfo {
                        text: chunk.clone(),
                        ..Default::default()
                    }],
                    finish_reason: if last {
                        pb::FinishReason::Stop as i32
                    } else {
                        0
                    },
                    model: first.then(|| resolved(&request.model)),
                    ..Default::default()
                }));
                first = false;
            }
        }
        if let Some(Ok(last)) = messages.last_mut() {
            last.usage = Some(pb::Usage {
                prompt_tokens: 5,
                completion_tokens: chunks.len() as u32 * n,
                total_tokens: 5 + chunks.len() as u32 * n,
                cached_prompt_tokens: 0,
            });
        }
        Ok(Response::new(Box::pin(futures::stream::iter(messages))))
    }

    /// One token per whitespace-separated word of every message.
    async fn count_tokens(
        &self,
        request: Request<pb::CountTokensRequest>,
    ) -> Result<Response<pb::CountTokensResponse>, Status> {
        let count = match request.into_inner().input {
            Some(pb::count_tokens_request::Input::Text(t)) => t.split_whitespace().count(),
            Some(pb::count_tokens_request::Input::Chat(c)) => c
                .messages
                .iter()
                .map(|m| m.content.split_whitespace().count())
                .sum(),
            None => 0,
        };
        Ok(Response::new(pb::CountTokensResponse {
            token_count: count as u32,
            context_length: 1024,
        }))
    }
}

/// A running gateway.
pub struct TestGateway {
    pub http: String,
    pub grpc: SocketAddr,
    pub schema: String,
    pub admin_key: String,
    pub client: reqwest::Client,
    stop_tx: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

pub const ADMIN_KEY: &str = "lmf_test_bootstrap_admin_key";

impl TestGateway {
    /// A gateway in front of `inference`, with `routing` as its routing file.
    pub async fn start(label: &str, inference: SocketAddr, routing: &str) -> Self {
        Self::start_with(label, inference, routing, |_| {}).await
    }

    /// As [`TestGateway::start`], `tune` adjusting the config.
    pub async fn start_with(
        label: &str,
        inference: SocketAddr,
        routing: &str,
        tune: impl FnOnce(&mut lmforge_gateway::Config),
    ) -> Self {
        let schema = unique_schema(label);
        let dir = tempfile::tempdir().expect("temp dir");
        let routing_path = dir.path().join("routing.yaml");
        std::fs::write(&routing_path, routing).expect("write routing file");
        let mut config =
            lmforge_gateway::Config::try_parse_from(["lmforge-gateway"]).expect("defaults");
        config.postgres.database_url = database_url();
        config.schema = schema.clone();
        config.inference_url = format!("http://{inference}").parse().expect("url");
        config.routing_file = Some(routing_path);
        config.routing_poll = Duration::from_millis(20);
        config.admin_key = Some(ADMIN_KEY.to_owned());
        config.lifecycle.probe_interval = Duration::from_millis(100);
        tune(&mut config);
        let listeners = Listeners::ephemeral().await.expect("bind");
        let grpc = listeners.grpc_addr();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind http");
        let http_addr = http.local_addr().expect("addr");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            lmforge_gateway::serve_with_http(config, listeners, http, async {
                let _ = stop_rx.await;
            })
            .await
            .expect("gateway serves");
        });
        let gateway = Self {
            http: format!("http://{http_addr}"),
            grpc,
            schema,
            admin_key: ADMIN_KEY.to_owned(),
            client: reqwest::Client::new(),
            stop_tx: Some(stop_tx),
            task: Some(task),
            _dir: dir,
        };
        // Ready once the admin API answers (migrations done).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut admin) = gateway.admin().await
                && admin
                    .list_api_keys(gateway.authed(pb::ListApiKeysRequest::default()))
                    .await
                    .is_ok()
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gateway did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        gateway
    }

    /// Rewrites the routing file.
    pub fn set_routing(&self, routing: &str) {
        std::fs::write(self._dir.path().join("routing.yaml"), routing).expect("write");
    }

    pub async fn admin(
        &self,
    ) -> Result<GatewayAdminServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
        GatewayAdminServiceClient::connect(format!("http://{}", self.grpc)).await
    }

    /// `request` with the admin key.
    pub fn authed<T>(&self, request: T) -> Request<T> {
        bearer(&self.admin_key, request)
    }

    /// Creates a key; returns (id, secret).
    pub async fn key(&self, name: &str, models: &[&str], rpm: u32, tpm: u32) -> (String, String) {
        let created = self
            .admin()
            .await
            .expect("admin")
            .create_api_key(self.authed(pb::CreateApiKeyRequest {
                name: name.to_owned(),
                allowed_models: models.iter().map(|m| (*m).to_owned()).collect(),
                rate_limits: Some(pb::RateLimits {
                    requests_per_minute: rpm,
                    tokens_per_minute: tpm,
                }),
                ..Default::default()
            }))
            .await
            .expect("create key")
            .into_inner();
        (created.key.expect("key").id, created.secret)
    }

    /// POSTs JSON with `key`; returns (status, headers, body).
    pub async fn post(
        &self,
        path: &str,
        key: &str,
        body: &serde_json::Value,
    ) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
        let response = self
            .client
            .post(format!("{}{path}", self.http))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("send");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (status, headers, json)
    }

    /// POSTs a streaming request; returns the `data:` payloads.
    pub async fn post_stream(
        &self,
        path: &str,
        key: &str,
        body: &serde_json::Value,
    ) -> Vec<String> {
        let response = self
            .client
            .post(format!("{}{path}", self.http))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .expect("send");
        assert_eq!(response.status().as_u16(), 200, "stream refused");
        let text = response.text().await.expect("body");
        text.lines()
            .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            .map(|l| l.trim().to_owned())
            .collect()
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        }
        drop_schema(&self.schema).await;
    }
}

/// The chat content of a (non-streamed) answer's choice `i`.
/// A gRPC request carrying `authorization: Bearer <key>`.
pub fn bearer<T>(key: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {key}").parse().expect("ascii"),
    );
    request
}

/// A gRPC chat request of one user turn.
pub fn user_chat(model: &str, content: &str) -> pb::ChatCompletionRequest {
    pb::ChatCompletionRequest {
        model: model.into(),
        messages: vec![pb::OpenAiChatMessage {
            role: "user".into(),
            content: content.into(),
            name: None,
        }],
        ..Default::default()
    }
}

pub fn content(body: &serde_json::Value, i: usize) -> String {
    body["choices"][i]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}
