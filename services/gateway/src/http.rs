//! The OpenAI-compatible HTTP API (axum): `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/models` and the `POST /v1/batch` extension. Requests are
//! parsed into [`GenRequest`] here (errors name the JSON path), answers rendered in OpenAI's
//! shapes, streams as server-sent events ending in `data: [DONE]`. Every request gets an
//! `http.server` span and the `http_server_*` metrics ([`lmforge_telemetry::http`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::types::{
    GenOutput, GenRequest, Input, Message, ResponseFormat, StreamEvent, TokenLogprob, unix_now,
};

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        let (status, _, _) = self.http_parts();
        let mut response = (
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            Json(self.to_json()),
        )
            .into_response();
        if let GatewayError::RateLimited { retry_after, .. } = &self {
            let seconds = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// The HTTP router over `gateway`.
pub fn router(gateway: Arc<Gateway>) -> Router {
    let limit = gateway.limits.max_body_bytes;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/batch", post(batch))
        .layer(DefaultBodyLimit::max(limit))
        // Outermost: a server span per request (continuing the caller's `traceparent`) that
        // the whole pipeline, upstream calls included, runs in, and request metrics.
        .layer(axum::middleware::from_fn_with_state(
            crate::NAME,
            lmforge_telemetry::http::trace_http,
        ))
        .with_state(gateway)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
struct ContentPart {
    #[serde(default)]
    text: String,
}

#[derive(Debug, Deserialize)]
struct MessageBody {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
struct ResponseFormatBody {
    r#type: String,
    #[serde(default)]
    json_schema: Option<JsonSchemaBody>,
}

/// `response_format.json_schema`; `description` and `strict` are accepted and not needed
/// (outputs always follow the schema).
#[derive(Debug, Deserialize)]
struct JsonSchemaBody {
    #[serde(default)]
    name: String,
    #[serde(default)]
    schema: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptionsBody {
    #[serde(default)]
    include_usage: bool,
}

/// Fields common to both endpoints, taken out of either body.
#[derive(Debug, Default)]
struct Common {
    model: String,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    n: Option<u32>,
    stop: Option<OneOrMany>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<HashMap<String, f64>>,
    seed: Option<i64>,
    user: Option<String>,
    stream: Option<bool>,
    stream_options: Option<StreamOptionsBody>,
    top_k: Option<u32>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    stop_token_ids: Option<Vec<u32>>,
    ignore_eos: Option<bool>,
    no_cache: Option<bool>,
    preset: Option<String>,
}

/// A request body: the common fields plus the endpoint's own. (Not `#[serde(flatten)]`:
/// flattening loses the field path that a 400 must name.)
macro_rules! body {
    ($name:ident { $($field:ident : $ty:ty),* $(,)? }) => {
        #[derive(Debug, Deserialize)]
        struct $name {
            #[serde(default)]
            model: String,
            max_tokens: Option<u32>,
            temperature: Option<f64>,
            top_p: Option<f64>,
            n: Option<u32>,
            stop: Option<OneOrMany>,
            presence_penalty: Option<f64>,
            frequency_penalty: Option<f64>,
            logit_bias: Option<HashMap<String, f64>>,
            seed: Option<i64>,
            user: Option<String>,
            stream: Option<bool>,
            stream_options: Option<StreamOptionsBody>,
            top_k: Option<u32>,
            min_p: Option<f64>,
            repetition_penalty: Option<f64>,
            stop_token_ids: Option<Vec<u32>>,
            ignore_eos: Option<bool>,
            no_cache: Option<bool>,
            preset: Option<String>,
            $($field: $ty,)*
        }

        impl $name {
            fn take_common(&mut self) -> Common {
                Common {
                    model: std::mem::take(&mut self.model),
                    max_tokens: self.max_tokens,
                    temperature: self.temperature,
                    top_p: self.top_p,
                    n: self.n,
                    stop: self.stop.take(),
                    presence_penalty: self.presence_penalty,
                    frequency_penalty: self.frequency_penalty,
                    logit_bias: self.logit_bias.take(),
                    seed: self.seed,
                    user: self.user.take(),
                    stream: self.stream,
                    stream_options: self.stream_options.take(),
                    top_k: self.top_k,
                    min_p: self.min_p,
                    repetition_penalty: self.repetition_penalty,
                    stop_token_ids: self.stop_token_ids.take(),
                    ignore_eos: self.ignore_eos,
                    no_cache: self.no_cache,
                    preset: self.preset.take(),
                }
            }
        }
    };
}

body!(ChatBody {
    messages: Option<Vec<MessageBody>>,
    max_completion_tokens: Option<u32>,
    logprobs: Option<bool>,
    top_logprobs: Option<u32>,
    response_format: Option<ResponseFormatBody>,
});

body!(CompletionBody {
    prompt: Option<OneOrMany>,
    logprobs: Option<u32>,
    echo: Option<bool>,
    suffix: Option<String>,
});

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, GatewayError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let param = if path == "." { "body".to_owned() } else { path };
        GatewayError::invalid(param, e.inner().to_string())
    })
}

fn common_into(common: Common, input: Input) -> Result<(GenRequest, bool), GatewayError> {
    let mut r = GenRequest::new(common.model, input);
    r.max_tokens = common.max_tokens;
    r.temperature = common.temperature;
    r.top_p = common.top_p;
    r.n = common.n.unwrap_or(1);
    r.stop = common.stop.map(OneOrMany::into_vec).unwrap_or_default();
    r.presence_penalty = common.presence_penalty;
    r.frequency_penalty = common.frequency_penalty;
    for (token, bias) in common.logit_bias.unwrap_or_default() {
        let id = token.parse::<u32>().map_err(|_| {
            GatewayError::invalid(format!("logit_bias.{token}"), "keys must be token ids")
        })?;
        r.logit_bias.insert(id, bias);
    }
    r.seed = common.seed;
    r.user = common.user.unwrap_or_default();
    r.include_usage = common.stream_options.unwrap_or_default().include_usage;
    r.top_k = common.top_k;
    r.min_p = common.min_p;
    r.repetition_penalty = common.repetition_penalty;
    r.stop_token_ids = common.stop_token_ids.unwrap_or_default();
    r.ignore_eos = common.ignore_eos.unwrap_or(false);
    r.no_cache = common.no_cache.unwrap_or(false);
    r.preset = common.preset;
    Ok((r, common.stream.unwrap_or(false)))
}

fn chat_request(mut body: ChatBody) -> Result<(GenRequest, bool), GatewayError> {
    let common = body.take_common();
    let messages = body
        .messages
        .unwrap_or_default()
        .into_iter()
        .map(|m| Message {
            role: m.role,
            content: match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => parts.into_iter().map(|p| p.text).collect(),
            },
            name: m.name,
        })
        .collect();
    let (mut r, stream) = common_into(common, Input::Chat(messages))?;
    if body.max_completion_tokens.is_some() {
        r.max_tokens = body.max_completion_tokens;
    }
    r.logprobs = body.logprobs.unwrap_or(false);
    r.top_logprobs = body.top_logprobs;
    if r.top_logprobs.is_some_and(|k| k > 0) && !r.logprobs {
        return Err(GatewayError::invalid(
            "top_logprobs",
            "requires `logprobs: true`",
        ));
    }
    if let Some(format) = body.response_format {
        r.response_format = ResponseFormat::parse(
            &format.r#type,
            format.json_schema.map(|j| (j.name, j.schema)),
        )?;
    }
    Ok((r, stream))
}

fn completion_request(mut body: CompletionBody) -> Result<(GenRequest, bool), GatewayError> {
    let common = body.take_common();
    let prompt = match body.prompt.map(OneOrMany::into_vec) {
        None => String::new(),
        Some(mut prompts) if prompts.len() <= 1 => prompts.pop().unwrap_or_default(),
        Some(_) => {
            return Err(GatewayError::invalid(
                "prompt",
                "one prompt per request; use /v1/batch for many",
            ));
        }
    };
    if body.suffix.is_some_and(|s| !s.is_empty()) {
        return Err(GatewayError::invalid("suffix", "`suffix` is not supported"));
    }
    let (mut r, stream) = common_into(common, Input::Text(prompt))?;
    if r.max_tokens.is_none() {
        r.max_tokens = Some(16);
    }
    if let Some(k) = body.logprobs {
        if k > 5 {
            return Err(GatewayError::invalid("logprobs", "must be in [0, 5]"));
        }
        r.logprobs = true;
        r.top_logprobs = Some(k);
    }
    r.echo = body.echo.unwrap_or(false);
    Ok((r, stream))
}

fn auth_header(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

fn with_request_id(mut response: Response, request_id: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn chat(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    handle(gateway, headers, body, true).await
}

async fn completions(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    handle(gateway, headers, body, false).await
}

fn body_bytes(
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    body.map_err(|_| {
        GatewayError::invalid(
            "body",
            format!("the request body is over the limit of {limit} bytes"),
        )
    })
}

async fn handle(
    gateway: Arc<Gateway>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    chat: bool,
) -> Response {
    let key = match gateway.authenticate(auth_header(&headers)).await {
        Ok(key) => key,
        Err(error) => return error.into_response(),
    };
    let parsed = body_bytes(body, gateway.limits.max_body_bytes).and_then(|body| {
        if chat {
            parse::<ChatBody>(&body).and_then(chat_request)
        } else {
            parse::<CompletionBody>(&body).and_then(completion_request)
        }
    });
    let (request, stream) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => return error.into_response(),
    };
    let id = format!(
        "{}{}",
        if chat { "chatcmpl-" } else { "cmpl-" },
        uuid::Uuid::new_v4().simple()
    );
    let created = unix_now();
    let model = request.model.clone();
    if !stream {
        return match gateway.complete(key, request).await {
            Ok(out) => {
                let body = if chat {
                    chat_json(&out, &id, created, &model)
                } else {
                    completion_json(&out, &id, created, &model)
                };
                with_request_id(Json(body).into_response(), &out.provenance.request_id)
            }
            Err(error) => error.into_response(),
        };
    }
    let include_usage = request.include_usage;
    let n = request.n;
    let logprobs = request.logprobs;
    let events = match gateway.stream(key, request).await {
        Ok(events) => events,
        Err(error) => return error.into_response(),
    };
    let render = StreamRender {
        chat,
        id,
        created,
        model,
        include_usage,
        n,
        logprobs,
        fingerprint: String::new(),
        prefix: String::new(),
    };
    // Server-sent events, written by hand rather than through `axum::response::Sse` so that
    // every event ready at once (a burst of tokens) goes out as one body frame.
    let body = tokio_stream::wrappers::ReceiverStream::new(events)
        .ready_chunks(64)
        .scan(render, |render, events| {
            let mut frame = String::new();
            for event in events {
                for data in render.render(event) {
                    frame.push_str("data: ");
                    frame.push_str(&data);
                    frame.push_str("\n\n");
                }
            }
            futures::future::ready(Some(Ok::<_, Infallible>(Bytes::from(frame))))
        })
        .chain(futures::stream::once(async {
            Ok(Bytes::from_static(b"data: [DONE]\n\n"))
        }));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

fn logprobs_json(logprobs: &[TokenLogprob]) -> Value {
    json!({
        "content": logprobs.iter().map(|t| json!({
            "token": t.token,
            "logprob": t.logprob,
            "bytes": t.bytes,
            "top_logprobs": t.top.iter().map(|(token, logprob, bytes)| json!({
                "token": token, "logprob": logprob, "bytes": bytes,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>()
    })
}

fn legacy_logprobs_json(logprobs: &[TokenLogprob]) -> Value {
    let mut offset = 0usize;
    let mut offsets = Vec::new();
    for t in logprobs {
        offsets.push(offset);
        offset += t.token.chars().count();
    }
    json!({
        "tokens": logprobs.iter().map(|t| &t.token).collect::<Vec<_>>(),
        "token_logprobs": logprobs.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "top_logprobs": logprobs.iter().map(|t| t.top.iter().map(|(k, v, _)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

fn usage_json(prompt: u32, completion: u32) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn meta_json(p: &crate::types::Provenance) -> Value {
    json!({
        "request_id": p.request_id,
        "route": p.route,
        "resolved_model": p.resolved_model,
        "model_digest": p.model_digest,
        "upstream": p.upstream,
        "cache_hit": p.cache_hit,
        "filtered": p.filtered,
        "filter_rules": p.filter_rules,
    })
}

/// `chat.completion`.
pub fn chat_json(out: &GenOutput, id: &str, created: i64, model: &str) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": out.choices.iter().map(|c| json!({
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "finish_reason": c.finish_reason,
            "logprobs": c.logprobs.as_deref().map(logprobs_json),
        })).collect::<Vec<_>>(),
        "usage": usage_json(out.prompt_tokens, out.completion_tokens),
        "system_fingerprint": out.provenance.fingerprint(),
        "lmforge": meta_json(&out.provenance),
    })
}

/// `text_completion`.
pub fn completion_json(out: &GenOutput, id: &str, created: i64, model: &str) -> Value {
    json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": out.choices.iter().map(|c| json!({
            "index": c.index,
            "text": c.text,
            "finish_reason": c.finish_reason,
            "logprobs": c.logprobs.as_deref().map(legacy_logprobs_json),
        })).collect::<Vec<_>>(),
        "usage": usage_json(out.prompt_tokens, out.completion_tokens),
        "system_fingerprint": out.provenance.fingerprint(),
        "lmforge": meta_json(&out.provenance),
    })
}

/// Renders stream events as SSE `data:` payloads.
struct StreamRender {
    chat: bool,
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
    n: u32,
    logprobs: bool,
    fingerprint: String,
    /// The JSON every chunk starts with, up to `"choices":[` (set at `Start`): text deltas,
    /// nearly every event, are written straight after it without a `Value` tree.
    prefix: String,
}

impl StreamRender {
    fn set_prefix(&mut self) {
        self.prefix = format!(
            "{{\"id\":{},\"object\":\"{}\",\"created\":{},\"model\":{},\"system_fingerprint\":{},\"choices\":[",
            Value::from(self.id.as_str()),
            if self.chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            },
            self.created,
            Value::from(self.model.as_str()),
            Value::from(self.fingerprint.as_str()),
        );
    }

    /// A plain text delta (no logprobs), rendered by hand.
    fn text_delta(&self, index: u32, text: &str) -> String {
        let text = Value::from(text);
        if self.chat {
            format!(
                "{}{{\"index\":{index},\"delta\":{{\"content\":{text}}},\"finish_reason\":null,\"logprobs\":null}}]}}",
                self.prefix
            )
        } else {
            format!(
                "{}{{\"index\":{index},\"text\":{text},\"finish_reason\":null,\"logprobs\":null}}]}}",
                self.prefix
            )
        }
    }

    fn chunk(&self, choices: Vec<Value>, usage: Option<Value>, meta: Option<Value>) -> String {
        let mut body = json!({
            "id": self.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "system_fingerprint": self.fingerprint,
        });
        if let Some(usage) = usage {
            body["usage"] = usage;
        }
        if let Some(meta) = meta {
            body["lmforge"] = meta;
        }
        body.to_string()
    }

    fn choice(
        &self,
        index: u32,
        text: Option<&str>,
        role: bool,
        finish: Option<&str>,
        logprobs: Option<&[TokenLogprob]>,
    ) -> Value {
        if self.chat {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(text) = text {
                delta.insert("content".into(), json!(text));
            }
            json!({
                "index": index,
                "delta": delta,
                "finish_reason": finish,
                "logprobs": logprobs.filter(|_| self.logprobs).map(logprobs_json),
            })
        } else {
            json!({
                "index": index,
                "text": text.unwrap_or_default(),
                "finish_reason": finish,
                "logprobs": logprobs.filter(|_| self.logprobs).map(legacy_logprobs_json),
            })
        }
    }

    fn render(&mut self, event: StreamEvent) -> Vec<String> {
        match event {
            StreamEvent::Start(provenance) => {
                self.fingerprint = provenance.fingerprint();
                self.set_prefix();
                if !self.chat {
                    return Vec::new();
                }
                let choices = (0..self.n)
                    .map(|i| self.choice(i, Some(""), true, None, None))
                    .collect();
                vec![self.chunk(choices, None, Some(meta_json(&provenance)))]
            }
            StreamEvent::Delta {
                index,
                text,
                logprobs: None,
            } if !self.prefix.is_empty() => vec![self.text_delta(index, &text)],
            StreamEvent::Delta {
                index,
                text,
                logprobs,
            } => {
                vec![self.chunk(
                    vec![self.choice(index, Some(&text), false, None, logprobs.as_deref())],
                    None,
                    None,
                )]
            }
            StreamEvent::Finish {
                index,
                finish_reason,
            } => {
                vec![self.chunk(
                    vec![self.choice(index, None, false, Some(&finish_reason), None)],
                    None,
                    None,
                )]
            }
            StreamEvent::Error(error) => vec![error.to_json().to_string()],
            StreamEvent::End {
                prompt_tokens,
                completion_tokens,
                provenance,
            } => {
                let usage = self
                    .include_usage
                    .then(|| usage_json(prompt_tokens, completion_tokens));
                if usage.is_none() && !provenance.filtered {
                    return Vec::new();
                }
                vec![self.chunk(Vec::new(), usage, Some(meta_json(&provenance)))]
            }
        }
    }
}

async fn models(State(gateway): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    let key = match gateway.authenticate(auth_header(&headers)).await {
        Ok(key) => key,
        Err(error) => return error.into_response(),
    };
    let models = gateway.list_models(&key).await;
    Json(json!({
        "object": "list",
        "data": models.iter().map(|m| json!({
            "id": m.id,
            "object": "model",
            "created": m.created,
            "owned_by": m.owned_by,
            "resolved_model": m.resolved_model,
            "context_length": m.context_length,
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
struct BatchBody {
    requests: Vec<Value>,
}

/// Many chat (`{"chat": {...}}`) or text (`{"completion": {...}}`) requests at once; they
/// run concurrently, so the engine batches them; each item fails on its own.
async fn batch(
    State(gateway): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let key = match gateway.authenticate(auth_header(&headers)).await {
        Ok(key) => key,
        Err(error) => return error.into_response(),
    };
    let body = match body_bytes(body, gateway.limits.max_body_bytes)
        .and_then(|b| parse::<BatchBody>(&b))
    {
        Ok(body) => body,
        Err(error) => return error.into_response(),
    };
    if body.requests.is_empty() || body.requests.len() > 256 {
        return GatewayError::invalid("requests", "1–256 requests").into_response();
    }
    let items = futures::future::join_all(body.requests.into_iter().enumerate().map(|(index, item)| {
        let gateway = gateway.clone();
        let key = key.clone();
        async move {
            let (chat, value) = match (item.get("chat"), item.get("completion")) {
                (Some(chat), _) => (true, chat.clone()),
                (None, Some(completion)) => (false, completion.clone()),
                (None, None) => {
                    return json!({"index": index, "error": GatewayError::invalid(format!("requests[{index}]"), "needs `chat` or `completion`").to_json()["error"]});
                }
            };
            let parsed = if chat {
                serde_json::from_value::<ChatBody>(value).map_err(|e| GatewayError::invalid(format!("requests[{index}]"), e.to_string())).and_then(chat_request)
            } else {
                serde_json::from_value::<CompletionBody>(value).map_err(|e| GatewayError::invalid(format!("requests[{index}]"), e.to_string())).and_then(completion_request)
            };
            let result = match parsed {
                Ok((request, _)) => {
                    let model = request.model.clone();
                    gateway.complete(key, request).await.map(|out| (out, model))
                }
                Err(error) => Err(error),
            };
            let id = format!("{}{}", if chat { "chatcmpl-" } else { "cmpl-" }, uuid::Uuid::new_v4().simple());
            match result {
                Ok((out, model)) if chat => json!({"index": index, "chat": chat_json(&out, &id, unix_now(), &model)}),
                Ok((out, model)) => json!({"index": index, "completion": completion_json(&out, &id, unix_now(), &model)}),
                Err(error) => json!({"index": index, "error": error.to_json()["error"]}),
            }
        }
    }))
    .await;
    Json(json!({"items": items})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_rendered_deltas_equal_the_generic_rendering() {
        for chat in [true, false] {
            let mut render = StreamRender {
                chat,
                id: "chatcmpl-1".into(),
                created: 7,
                model: "m\"odel".into(),
                include_usage: false,
                n: 1,
                logprobs: false,
                fingerprint: String::new(),
                prefix: String::new(),
            };
            render.render(StreamEvent::Start(crate::types::Provenance::default()));
            let fast: Value =
                serde_json::from_str(&render.text_delta(0, "a \"b\"\n")).expect("json");
            let slow: Value = serde_json::from_str(&render.chunk(
                vec![render.choice(0, Some("a \"b\"\n"), false, None, None)],
                None,
                None,
            ))
            .expect("json");
            assert_eq!(fast, slow);
        }
    }
}
