//! The gRPC fronts: `lmforge.v1.OpenAIService` (the HTTP API's mirror, same pipeline) and
//! `lmforge.v1.GatewayAdminService` (API keys, routing statistics, rule reloads). Messages
//! are converted to and from the domain types at this edge.

use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::gateway_admin_service_server::GatewayAdminService;
use lmforge_proto::v1::open_ai_service_server::OpenAiService;
use tonic::{Request, Response, Status};

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::keys::{ApiKey, NewKey};
use crate::types::{
    GenOutput, GenRequest, Input, Message, Provenance, ResponseFormat, StreamEvent, TokenLogprob,
    unix_now,
};

/// `lmforge.v1.OpenAIService`.
#[derive(Debug, Clone)]
pub struct OpenAiApi {
    gateway: Arc<Gateway>,
}

impl OpenAiApi {
    /// The service over `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

fn auth<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
}

fn chat_request(r: pb::ChatCompletionRequest) -> Result<GenRequest, GatewayError> {
    let pb::ChatCompletionRequest {
        model,
        messages,
        max_tokens,
        max_completion_tokens,
        temperature,
        top_p,
        n,
        stop,
        presence_penalty,
        frequency_penalty,
        logit_bias,
        logprobs,
        top_logprobs,
        seed,
        response_format,
        user,
        stream_options,
        top_k,
        min_p,
        repetition_penalty,
        stop_token_ids,
        ignore_eos,
        no_cache,
    } = r;
    let messages = messages
        .into_iter()
        .map(|m| Message {
            role: m.role,
            content: m.content,
            name: m.name,
        })
        .collect();
    let mut g = GenRequest::new(model, Input::Chat(messages));
    g.max_tokens = max_completion_tokens.or(max_tokens);
    g.temperature = temperature;
    g.top_p = top_p;
    g.n = n.unwrap_or(1);
    g.stop = stop;
    g.presence_penalty = presence_penalty;
    g.frequency_penalty = frequency_penalty;
    g.logit_bias = parse_bias(logit_bias)?;
    g.logprobs = logprobs.unwrap_or(false);
    g.top_logprobs = top_logprobs;
    g.seed = seed;
    if let Some(format) = response_format {
        g.response_format = ResponseFormat::parse(
            &format.r#type,
            format.json_schema.map(|j| {
                let schema = j.schema.as_ref().map(lmforge_proto::json::struct_to_json);
                (j.name, schema)
            }),
        )?;
    }
    g.user = user;
    g.include_usage = stream_options.is_some_and(|o| o.include_usage);
    g.top_k = top_k;
    g.min_p = min_p;
    g.repetition_penalty = repetition_penalty;
    g.stop_token_ids = stop_token_ids;
    g.ignore_eos = ignore_eos;
    g.no_cache = no_cache;
    Ok(g)
}

fn completion_request(r: pb::CompletionRequest) -> Result<GenRequest, GatewayError> {
    let pb::CompletionRequest {
        model,
        prompt,
        max_tokens,
        temperature,
        top_p,
        n,
        stop,
        presence_penalty,
        frequency_penalty,
        logit_bias,
        logprobs,
        echo,
        suffix,
        seed,
        user,
        stream_options,
        top_k,
        min_p,
        repetition_penalty,
        stop_token_ids,
        ignore_eos,
        no_cache,
    } = r;
    if !suffix.is_empty() {
        return Err(GatewayError::invalid("suffix", "`suffix` is not supported"));
    }
    let mut g = GenRequest::new(model, Input::Text(prompt));
    g.max_tokens = Some(max_tokens.unwrap_or(16));
    g.temperature = temperature;
    g.top_p = top_p;
    g.n = n.unwrap_or(1);
    g.stop = stop;
    g.presence_penalty = presence_penalty;
    g.frequency_penalty = frequency_penalty;
    g.logit_bias = parse_bias(logit_bias)?;
    if let Some(k) = logprobs {
        if k > 5 {
            return Err(GatewayError::invalid("logprobs", "must be in [0, 5]"));
        }
        g.logprobs = true;
        g.top_logprobs = Some(k);
    }
    g.echo = echo;
    g.seed = seed;
    g.user = user;
    g.include_usage = stream_options.is_some_and(|o| o.include_usage);
    g.top_k = top_k;
    g.min_p = min_p;
    g.repetition_penalty = repetition_penalty;
    g.stop_token_ids = stop_token_ids;
    g.ignore_eos = ignore_eos;
    g.no_cache = no_cache;
    Ok(g)
}

fn parse_bias(
    bias: std::collections::HashMap<String, f64>,
) -> Result<std::collections::BTreeMap<u32, f64>, GatewayError> {
    bias.into_iter()
        .map(|(k, v)| {
            k.parse::<u32>().map(|id| (id, v)).map_err(|_| {
                GatewayError::invalid(format!("logit_bias.{k}"), "keys must be token ids")
            })
        })
        .collect()
}

fn meta(p: &Provenance) -> pb::GatewayResponseMetadata {
    pb::GatewayResponseMetadata {
        request_id: p.request_id.clone(),
        route: p.route.clone(),
        resolved_model: p.resolved_model.clone(),
        model_digest: p.model_digest.clone(),
        upstream: p.upstream.clone(),
        cache_hit: p.cache_hit,
        filtered: p.filtered,
        filter_rules: p.filter_rules.clone(),
    }
}

fn usage(prompt: u32, completion: u32) -> pb::CompletionUsage {
    pb::CompletionUsage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
    }
}

fn chat_logprobs(l: &[TokenLogprob]) -> pb::ChatChoiceLogprobs {
    pb::ChatChoiceLogprobs {
        content: l
            .iter()
            .map(|t| pb::OpenAiTokenLogprob {
                token: t.token.clone(),
                logprob: t.logprob,
                bytes: t.bytes.clone(),
                top_logprobs: t
                    .top
                    .iter()
                    .map(|(token, logprob, bytes)| pb::OpenAiTopLogprob {
                        token: token.clone(),
                        logprob: *logprob,
                        bytes: bytes.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn legacy_logprobs(l: &[TokenLogprob]) -> pb::CompletionLogprobs {
    let mut offset = 0u32;
    let mut text_offset = Vec::new();
    for t in l {
        text_offset.push(offset);
        offset += t.token.chars().count() as u32;
    }
    pb::CompletionLogprobs {
        tokens: l.iter().map(|t| t.token.clone()).collect(),
        token_logprobs: l.iter().map(|t| t.logprob).collect(),
        top_logprobs: l
            .iter()
            .map(|t| pb::TopLogprobsEntry {
                logprobs: t.top.iter().map(|(k, v, _)| (k.clone(), *v)).collect(),
            })
            .collect(),
        text_offset,
    }
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", uuid::Uuid::new_v4().simple())
}

fn chat_completion(out: &GenOutput, model: &str) -> pb::ChatCompletion {
    pb::ChatCompletion {
        id: new_id("chatcmpl-"),
        object: "chat.completion".into(),
        created: unix_now(),
        model: model.to_owned(),
        choices: out
            .choices
            .iter()
            .map(|c| pb::ChatCompletionChoice {
                index: c.index,
                message: Some(pb::OpenAiChatMessage {
                    role: "assistant".into(),
                    content: c.text.clone(),
                    name: None,
                }),
                finish_reason: c.finish_reason.clone(),
                logprobs: c.logprobs.as_deref().map(chat_logprobs),
            })
            .collect(),
        usage: Some(usage(out.prompt_tokens, out.completion_tokens)),
        system_fingerprint: out.provenance.fingerprint(),
        lmforge: Some(meta(&out.provenance)),
    }
}

fn completion(out: &GenOutput, model: &str) -> pb::Completion {
    pb::Completion {
        id: new_id("cmpl-"),
        object: "text_completion".into(),
        created: unix_now(),
        model: model.to_owned(),
        choices: out
            .choices
            .iter()
            .map(|c| pb::CompletionChoice {
                index: c.index,
                text: c.text.clone(),
                finish_reason: c.finish_reason.clone(),
                logprobs: c.logprobs.as_deref().map(legacy_logprobs),
            })
            .collect(),
        usage: Some(usage(out.prompt_tokens, out.completion_tokens)),
        system_fingerprint: out.provenance.fingerprint(),
        lmforge: Some(meta(&out.provenance)),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// What the chat and the completion streams do differently: their chunk and choice messages.
trait ChunkShape: Send + 'static {
    type Chunk: Send + 'static;
    type Choice;
    /// The choices of the first chunk.
    fn start(&self) -> Vec<Self::Choice>;
    /// A choice carrying text.
    fn delta(&self, index: u32, text: String, logprobs: Option<&[TokenLogprob]>) -> Self::Choice;
    /// A choice's last message.
    fn finish(&self, index: u32, finish_reason: String) -> Self::Choice;
    /// Whether the closing chunk (usage, metadata) is sent when usage was not asked for and
    /// nothing was filtered.
    const ALWAYS_CLOSE: bool;
    fn chunk(
        &self,
        choices: Vec<Self::Choice>,
        usage: Option<pb::CompletionUsage>,
        lmforge: Option<pb::GatewayResponseMetadata>,
        fingerprint: &str,
    ) -> Self::Chunk;
}

/// The gateway's stream events as chunks of `shape`.
fn chunk_stream<S: ChunkShape>(
    events: crate::gateway::EventStream,
    shape: S,
    include_usage: bool,
) -> BoxStream<S::Chunk> {
    let mut fingerprint = String::new();
    let stream = tokio_stream::wrappers::ReceiverStream::new(events).filter_map(move |event| {
        let item = match event {
            StreamEvent::Start(p) => {
                fingerprint = p.fingerprint();
                Some(Ok(shape.chunk(
                    shape.start(),
                    None,
                    Some(meta(&p)),
                    &fingerprint,
                )))
            }
            StreamEvent::Delta {
                index,
                text,
                logprobs,
            } => Some(Ok(shape.chunk(
                vec![shape.delta(index, text, logprobs.as_deref())],
                None,
                None,
                &fingerprint,
            ))),
            StreamEvent::Finish {
                index,
                finish_reason,
            } => Some(Ok(shape.chunk(
                vec![shape.finish(index, finish_reason)],
                None,
                None,
                &fingerprint,
            ))),
            StreamEvent::Error(error) => Some(Err(Status::from(error))),
            StreamEvent::End {
                prompt_tokens,
                completion_tokens,
                provenance,
            } => (S::ALWAYS_CLOSE || include_usage || provenance.filtered).then(|| {
                Ok(shape.chunk(
                    Vec::new(),
                    include_usage.then(|| usage(prompt_tokens, completion_tokens)),
                    Some(meta(&provenance)),
                    &fingerprint,
                ))
            }),
        };
        futures::future::ready(item)
    });
    Box::pin(stream)
}

/// `chat.completion.chunk`s: the first opens every choice with the assistant role.
struct ChatChunks {
    id: String,
    created: i64,
    model: String,
    n: u32,
}

impl ChunkShape for ChatChunks {
    type Chunk = pb::ChatCompletionChunk;
    type Choice = pb::ChatCompletionChunkChoice;
    const ALWAYS_CLOSE: bool = false;

    fn start(&self) -> Vec<Self::Choice> {
        (0..self.n)
            .map(|index| pb::ChatCompletionChunkChoice {
                index,
                delta: Some(pb::ChatCompletionDelta {
                    role: Some("assistant".into()),
                    content: Some(String::new()),
                }),
                finish_reason: None,
                logprobs: None,
            })
            .collect()
    }

    fn delta(&self, index: u32, text: String, logprobs: Option<&[TokenLogprob]>) -> Self::Choice {
        pb::ChatCompletionChunkChoice {
            index,
            delta: Some(pb::ChatCompletionDelta {
                role: None,
                content: Some(text),
            }),
            finish_reason: None,
            logprobs: logprobs.map(chat_logprobs),
        }
    }

    fn finish(&self, index: u32, finish_reason: String) -> Self::Choice {
        pb::ChatCompletionChunkChoice {
            index,
            delta: Some(pb::ChatCompletionDelta::default()),
            finish_reason: Some(finish_reason),
            logprobs: None,
        }
    }

    fn chunk(
        &self,
        choices: Vec<Self::Choice>,
        usage: Option<pb::CompletionUsage>,
        lmforge: Option<pb::GatewayResponseMetadata>,
        fingerprint: &str,
    ) -> Self::Chunk {
        pb::ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: fingerprint.to_owned(),
            lmforge,
        }
    }
}

/// `text_completion` chunks; the closing one always carries the gateway's metadata.
struct CompletionChunks {
    id: String,
    created: i64,
    model: String,
}

impl ChunkShape for CompletionChunks {
    type Chunk = pb::Completion;
    type Choice = pb::CompletionChoice;
    const ALWAYS_CLOSE: bool = true;

    fn start(&self) -> Vec<Self::Choice> {
        Vec::new()
    }

    fn delta(&self, index: u32, text: String, logprobs: Option<&[TokenLogprob]>) -> Self::Choice {
        pb::CompletionChoice {
            index,
            text,
            finish_reason: String::new(),
            logprobs: logprobs.map(legacy_logprobs),
        }
    }

    fn finish(&self, index: u32, finish_reason: String) -> Self::Choice {
        pb::CompletionChoice {
            index,
            text: String::new(),
            finish_reason,
            logprobs: None,
        }
    }

    fn chunk(
        &self,
        choices: Vec<Self::Choice>,
        usage: Option<pb::CompletionUsage>,
        lmforge: Option<pb::GatewayResponseMetadata>,
        fingerprint: &str,
    ) -> Self::Chunk {
        pb::Completion {
            id: self.id.clone(),
            object: "text_completion".into(),
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
            system_fingerprint: fingerprint.to_owned(),
            lmforge,
        }
    }
}

impl OpenAiApi {
    async fn events(
        &self,
        header: Option<String>,
        request: GenRequest,
    ) -> Result<crate::gateway::EventStream, Status> {
        let key = self.gateway.authenticate(header.as_deref()).await?;
        Ok(self.gateway.stream(key, request).await?)
    }
}

#[tonic::async_trait]
impl OpenAiService for OpenAiApi {
    async fn create_chat_completion(
        &self,
        request: Request<pb::ChatCompletionRequest>,
    ) -> Result<Response<pb::ChatCompletion>, Status> {
        let key = self.gateway.authenticate(auth(&request)).await?;
        let g = chat_request(request.into_inner())?;
        let model = g.model.clone();
        let out = self.gateway.complete(key, g).await?;
        Ok(Response::new(chat_completion(&out, &model)))
    }

    async fn stream_chat_completion(
        &self,
        request: Request<pb::ChatCompletionRequest>,
    ) -> Result<Response<BoxStream<pb::ChatCompletionChunk>>, Status> {
        let header = auth(&request).map(str::to_owned);
        let g = chat_request(request.into_inner())?;
        let (model, n, include_usage) = (g.model.clone(), g.n, g.include_usage);
        let events = self.events(header, g).await?;
        let shape = ChatChunks {
            id: new_id("chatcmpl-"),
            created: unix_now(),
            model,
            n,
        };
        let stream = chunk_stream(events, shape, include_usage);
        Ok(Response::new(stream))
    }

    async fn create_completion(
        &self,
        request: Request<pb::CompletionRequest>,
    ) -> Result<Response<pb::Completion>, Status> {
        let key = self.gateway.authenticate(auth(&request)).await?;
        let g = completion_request(request.into_inner())?;
        let model = g.model.clone();
        let out = self.gateway.complete(key, g).await?;
        Ok(Response::new(completion(&out, &model)))
    }

    async fn stream_completion(
        &self,
        request: Request<pb::CompletionRequest>,
    ) -> Result<Response<BoxStream<pb::Completion>>, Status> {
        let header = auth(&request).map(str::to_owned);
        let g = completion_request(request.into_inner())?;
        let (model, include_usage) = (g.model.clone(), g.include_usage);
        let events = self.events(header, g).await?;
        let shape = CompletionChunks {
            id: new_id("cmpl-"),
            created: unix_now(),
            model,
        };
        let stream = chunk_stream(events, shape, include_usage);
        Ok(Response::new(stream))
    }

    async fn list_models(
        &self,
        request: Request<pb::OpenAiListModelsRequest>,
    ) -> Result<Response<pb::OpenAiListModelsResponse>, Status> {
        let key = self.gateway.authenticate(auth(&request)).await?;
        let models = self.gateway.list_models(&key).await;
        Ok(Response::new(pb::OpenAiListModelsResponse {
            object: "list".into(),
            data: models
                .into_iter()
                .map(|m| pb::OpenAiModel {
                    id: m.id,
                    object: "model".into(),
                    created: m.created,
                    owned_by: m.owned_by,
                    resolved_model: m.resolved_model,
                    context_length: m.context_length,
                })
                .collect(),
        }))
    }

    async fn batch_completions(
        &self,
        request: Request<pb::BatchCompletionsRequest>,
    ) -> Result<Response<pb::BatchCompletionsResponse>, Status> {
        let key = self.gateway.authenticate(auth(&request)).await?;
        let requests = request.into_inner().requests;
        if requests.is_empty() || requests.len() > 256 {
            return Err(GatewayError::invalid("requests", "1–256 requests").into());
        }
        let items = futures::future::join_all(requests.into_iter().enumerate().map(|(i, item)| {
            let key = key.clone();
            let gateway = self.gateway.clone();
            async move {
                use pb::batch_completions_item::Result as R;
                use pb::batch_completions_item_request::Request as Q;
                let result = match item.request {
                    Some(Q::Chat(chat)) => match chat_request(chat) {
                        Ok(g) => {
                            let model = g.model.clone();
                            gateway
                                .complete(key, g)
                                .await
                                .map(|o| R::Chat(chat_completion(&o, &model)))
                        }
                        Err(e) => Err(e),
                    },
                    Some(Q::Completion(c)) => match completion_request(c) {
                        Ok(g) => {
                            let model = g.model.clone();
                            gateway
                                .complete(key, g)
                                .await
                                .map(|o| R::Completion(completion(&o, &model)))
                        }
                        Err(e) => Err(e),
                    },
                    None => Err(GatewayError::invalid(
                        format!("requests[{i}].request"),
                        "required",
                    )),
                };
                pb::BatchCompletionsItem {
                    index: i as u32,
                    result: Some(result.unwrap_or_else(|e| R::Error(e.to_proto()))),
                }
            }
        }))
        .await;
        Ok(Response::new(pb::BatchCompletionsResponse { items }))
    }
}

/// Limits of keys created without any.
#[derive(Debug, Clone, Copy)]
pub struct KeyDefaults {
    pub requests_per_minute: u32,
    pub tokens_per_minute: u32,
}

/// `lmforge.v1.GatewayAdminService`.
#[derive(Debug, Clone)]
pub struct GatewayAdminApi {
    gateway: Arc<Gateway>,
    defaults: KeyDefaults,
}

impl GatewayAdminApi {
    /// The service over `gateway`.
    pub fn new(gateway: Arc<Gateway>, defaults: KeyDefaults) -> Self {
        Self { gateway, defaults }
    }

    async fn admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let key = self.gateway.authenticate(auth(request)).await?;
        if !key.admin {
            return Err(
                GatewayError::PermissionDenied("an admin API key is required".into()).into(),
            );
        }
        Ok(())
    }
}

fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

fn from_timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
}

fn key_proto(k: &ApiKey) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id.to_string(),
        name: k.name.clone(),
        prefix: k.prefix.clone(),
        allowed_models: k.allowed_models.clone(),
        rate_limits: Some(pb::RateLimits {
            requests_per_minute: k.requests_per_minute.max(0) as u32,
            tokens_per_minute: k.tokens_per_minute.max(0) as u32,
        }),
        admin: k.admin,
        expires_at: k.expires_at.map(timestamp),
        created_at: Some(timestamp(k.created_at)),
        revoked_at: k.revoked_at.map(timestamp),
        last_used_at: k.last_used_at.map(timestamp),
        metadata: k.metadata.0.clone(),
    }
}

fn duration(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[tonic::async_trait]
impl GatewayAdminService for GatewayAdminApi {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        self.admin(&request).await?;
        let pb::CreateApiKeyRequest {
            name,
            allowed_models,
            rate_limits,
            expiry,
            admin,
            metadata,
        } = request.into_inner();
        let expires_at = match expiry {
            None => None,
            Some(pb::create_api_key_request::Expiry::ExpiresAt(at)) => Some(
                from_timestamp(&at)
                    .ok_or_else(|| GatewayError::invalid("expires_at", "out of range"))?,
            ),
            Some(pb::create_api_key_request::Expiry::Ttl(ttl)) => {
                if ttl.seconds <= 0 && ttl.nanos <= 0 {
                    return Err(GatewayError::invalid("ttl", "must be > 0").into());
                }
                Some(
                    Utc::now()
                        + chrono::Duration::seconds(ttl.seconds)
                        + chrono::Duration::nanoseconds(i64::from(ttl.nanos)),
                )
            }
        };
        let limits = rate_limits.unwrap_or(pb::RateLimits {
            requests_per_minute: self.defaults.requests_per_minute,
            tokens_per_minute: self.defaults.tokens_per_minute,
        });
        let (key, secret) = self
            .gateway
            .keys
            .create(NewKey {
                name,
                allowed_models,
                requests_per_minute: limits.requests_per_minute,
                tokens_per_minute: limits.tokens_per_minute,
                admin,
                expires_at,
                metadata: metadata.into_iter().collect(),
            })
            .await?;
        Ok(Response::new(pb::CreateApiKeyResponse {
            key: Some(key_proto(&key)),
            secret,
        }))
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        self.admin(&request).await?;
        let pb::ListApiKeysRequest {
            page_size,
            page_token,
            include_inactive,
        } = request.into_inner();
        let size = match page_size {
            0 => 50,
            n if n < 0 => return Err(GatewayError::invalid("page_size", "must be ≥ 0").into()),
            n => n.min(1000),
        };
        let after = if page_token.is_empty() {
            None
        } else {
            let bad = || GatewayError::invalid("page_token", "malformed");
            let (at, id) = page_token.split_once('_').ok_or_else(bad)?;
            let micros: i64 = at.parse().map_err(|_| bad())?;
            Some((
                DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
                uuid::Uuid::parse_str(id).map_err(|_| bad())?,
            ))
        };
        let keys = self
            .gateway
            .keys
            .list(i64::from(size) + 1, after, include_inactive)
            .await?;
        let more = keys.len() > size as usize;
        let keys: Vec<ApiKey> = keys.into_iter().take(size as usize).collect();
        let next_page_token = match (more, keys.last()) {
            (true, Some(last)) => format!("{}_{}", last.created_at.timestamp_micros(), last.id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListApiKeysResponse {
            keys: keys.iter().map(key_proto).collect(),
            next_page_token,
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::ApiKey>, Status> {
        self.admin(&request).await?;
        let pb::RevokeApiKeyRequest { id, reason } = request.into_inner();
        if reason.chars().count() > 1024 {
            return Err(GatewayError::invalid("reason", "at most 1024 characters").into());
        }
        let key = self.gateway.keys.revoke(&id, &reason).await?;
        tracing::info!(key_id = %key.id, reason, "api key revoked");
        Ok(Response::new(key_proto(&key)))
    }

    async fn get_routing_stats(
        &self,
        request: Request<pb::GetRoutingStatsRequest>,
    ) -> Result<Response<pb::GetRoutingStatsResponse>, Status> {
        self.admin(&request).await?;
        let pb::GetRoutingStatsRequest { route, reset } = request.into_inner();
        let (since, routes) = self
            .gateway
            .stats
            .snapshot((!route.is_empty()).then_some(route.as_str()), reset);
        Ok(Response::new(pb::GetRoutingStatsResponse {
            routes: routes
                .into_iter()
                .map(|(name, c)| {
                    let percentiles = c.percentiles();
                    pb::RouteStats {
                        route: name,
                        model: c.model.clone(),
                        requests: c.requests,
                        errors: c.errors,
                        rate_limited: c.rate_limited,
                        cache_hits: c.cache_hits,
                        filtered: c.filtered,
                        prompt_tokens: c.prompt_tokens,
                        completion_tokens: c.completion_tokens,
                        in_flight: c.in_flight,
                        latency_p50: percentiles.map(|p| duration(p.0)),
                        latency_p95: percentiles.map(|p| duration(p.1)),
                        requests_by_target: c.by_target.into_iter().collect(),
                    }
                })
                .collect(),
            since: Some(timestamp(since)),
            replica: hostname(),
        }))
    }

    async fn reload_routing_rules(
        &self,
        request: Request<pb::ReloadRoutingRulesRequest>,
    ) -> Result<Response<pb::ReloadRoutingRulesResponse>, Status> {
        self.admin(&request).await?;
        let dry_run = request.into_inner().dry_run;
        let (routing, changed) = self.gateway.routing.reload(dry_run)?;
        Ok(Response::new(pb::ReloadRoutingRulesResponse {
            rules: routing
                .spec
                .models
                .iter()
                .map(|m| pb::RoutingRuleSummary {
                    name: m.name.clone(),
                    model: m.name.clone(),
                    targets: m
                        .targets
                        .iter()
                        .map(|t| pb::RouteTarget {
                            model_ref: t.clone(),
                            weight: 1,
                        })
                        .collect(),
                })
                .chain(routing.spec.rules.iter().map(|r| {
                    pb::RoutingRuleSummary {
                        name: r.name.clone(),
                        model: r.models.join(","),
                        targets: r
                            .model
                            .iter()
                            .map(|t| pb::RouteTarget {
                                model_ref: t.clone(),
                                weight: 1,
                            })
                            .collect(),
                    }
                }))
                .collect(),
            rules_sha256: routing.sha256.clone(),
            warnings: Vec::new(),
            loaded_at: (!dry_run).then(|| timestamp(Utc::now())),
            changed,
        }))
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| format!("gateway-{}", std::process::id()))
}
