//! `lmforge.v1.InferenceService` over the model manager and the engines.
//!
//! Every request is validated (fields named in INVALID_ARGUMENT), tokenized (chat messages
//! rendered with the version's template), checked against the context and the KV capacity,
//! and only then queued; a full queue answers RESOURCE_EXHAUSTED at once. Unary calls collect
//! the engine's events; streams forward them as they come, and dropping either (client gone)
//! cancels the request in the engine at its next iteration.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use lmforge_model::chat::Message;
use lmforge_model::sampling::SamplingParams;
use lmforge_model::stopping::StopConfig;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::inference_service_server::InferenceService;
use opentelemetry::trace::TraceContextExt;
use tokio::sync::mpsc::UnboundedReceiver;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

type BoxStream<T> = futures::stream::BoxStream<'static, Result<T, Status>>;

use crate::engine::constrain::{CompiledFormat, OutputFormat};
use crate::engine::{EngineHandle, EngineRequest, Event, Finish, SubmitError, record_rejection};
use crate::models::{ModelManager, Served};

/// Defaults and limits of the API.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// `max_tokens` when a request leaves it unset.
    pub default_max_tokens: u32,
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct InferenceApi {
    models: Arc<ModelManager>,
    inflight: Arc<Mutex<HashMap<String, EngineHandle>>>,
    limits: ApiLimits,
}

/// A validated request, ready for an engine.
struct Prepared {
    served: Arc<Served>,
    /// What the response needs of the request once it is handed to the engine.
    id: String,
    prompt_len: usize,
    n: usize,
    /// Taken by `submit`.
    request: Option<EngineRequest>,
    include_stop: bool,
    logprobs: bool,
    details: bool,
    arrived: Instant,
}

/// Removes a request id from the in-flight table when the call ends, however it ends.
struct InflightGuard {
    table: Arc<Mutex<HashMap<String, EngineHandle>>>,
    id: String,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.table.lock().expect("inflight").remove(&self.id);
    }
}

/// INVALID_ARGUMENT naming `field` in the message and in a `BadRequest` detail.
fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    let message = format!("{field}: {reason}");
    <Status as tonic_types::StatusExt>::with_error_details(
        tonic::Code::InvalidArgument,
        message.clone(),
        tonic_types::ErrorDetails::with_bad_request_violation(field, message),
    )
}

/// `response_format` compiled against the model's vocabulary; `None` for free text.
fn output_format(
    format: Option<&pb::ResponseFormat>,
    served: &Served,
    sf: &dyn Fn(&str) -> String,
) -> Result<Option<Arc<CompiledFormat>>, Status> {
    let Some(format) = format else {
        return Ok(None);
    };
    let kind = pb::ResponseFormatType::try_from(format.r#type)
        .map_err(|_| invalid(&sf("response_format.type"), "unknown value"))?;
    if kind != pb::ResponseFormatType::JsonSchema && !format.json_schema.is_empty() {
        return Err(invalid(
            &sf("response_format.json_schema"),
            "only allowed with RESPONSE_FORMAT_TYPE_JSON_SCHEMA",
        ));
    }
    let wanted = match kind {
        pb::ResponseFormatType::Unspecified | pb::ResponseFormatType::Text => return Ok(None),
        pb::ResponseFormatType::JsonObject => OutputFormat::JsonObject,
        pb::ResponseFormatType::JsonSchema => {
            let field = sf("response_format.json_schema");
            if format.json_schema.is_empty() {
                return Err(invalid(
                    &field,
                    "required with RESPONSE_FORMAT_TYPE_JSON_SCHEMA",
                ));
            }
            let schema = serde_json::from_str(&format.json_schema)
                .map_err(|e| invalid(&field, format!("not JSON: {e}")))?;
            OutputFormat::JsonSchema(schema)
        }
    };
    let grammars = served.grammars.as_ref().map_err(|e| {
        invalid(
            &sf("response_format.type"),
            format!("this model has no constrained decoding: {e}"),
        )
    })?;
    let field = match wanted {
        OutputFormat::JsonObject => sf("response_format.type"),
        OutputFormat::JsonSchema(_) => sf("response_format.json_schema"),
    };
    grammars
        .compile(&wanted)
        .map(Some)
        .map_err(|e| invalid(&field, e))
}

fn role_name(role: i32) -> Option<&'static str> {
    match pb::ChatRole::try_from(role).ok()? {
        pb::ChatRole::System => Some("system"),
        pb::ChatRole::User => Some("user"),
        pb::ChatRole::Assistant => Some("assistant"),
        pb::ChatRole::Tool => Some("tool"),
        pb::ChatRole::Unspecified => None,
    }
}

/// Render a chat input with the version's (or the request's) template.
fn render_chat(served: &Served, chat: &pb::ChatInput, field: &str) -> Result<String, Status> {
    if chat.messages.is_empty() {
        return Err(invalid(
            &format!("{field}.messages"),
            "at least one message is required",
        ));
    }
    let mut messages = Vec::with_capacity(chat.messages.len());
    for (i, m) in chat.messages.iter().enumerate() {
        let role = role_name(m.role)
            .ok_or_else(|| invalid(&format!("{field}.messages[{i}].role"), "required"))?;
        messages.push(Message::new(role, &m.content));
    }
    let template = if chat.chat_template.is_empty() {
        served.chat_template.clone().ok_or_else(|| {
            Status::failed_precondition(format!(
                "{field}: model {}/{} has no chat template; send a prompt or a chat_template",
                served.resolved.name, served.resolved.version
            ))
        })?
    } else {
        lmforge_model::chat::ChatTemplate::new(&chat.chat_template, &served.tokenizer)
    };
    template
        .render(&messages, chat.add_generation_prompt.unwrap_or(true))
        .map_err(|e| invalid(&format!("{field}.chat_template"), e))
}

fn encode(served: &Served, text: &str, special: bool, field: &str) -> Result<Vec<u32>, Status> {
    served
        .tokenizer
        .encode(text, special)
        .map_err(|e| invalid(field, e))
}

/// The earliest of the request's deadline and the call's gRPC timeout (less a margin so the
/// answer, with the output so far, still reaches the client).
fn deadline_of(
    deadline: Option<&prost_types::Timestamp>,
    grpc_timeout: Option<Duration>,
    now: Instant,
) -> Result<Option<Instant>, Status> {
    let mut out = None;
    if let Some(ts) = deadline {
        let at = SystemTime::try_from(*ts).map_err(|_| invalid("deadline", "not a valid time"))?;
        let left = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        out = Some(now + left);
    }
    if let Some(t) = grpc_timeout {
        let at = now + t.saturating_sub(t / 20 + Duration::from_millis(5));
        out = Some(out.map_or(at, |d: Instant| d.min(at)));
    }
    Ok(out)
}

/// `grpc-timeout` header value (`<digits><unit>`).
fn grpc_timeout(md: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = md.get("grpc-timeout")?.to_str().ok()?;
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn submit_status(e: SubmitError) -> Status {
    match e {
        SubmitError::QueueFull(why) => Status::resource_exhausted(format!("queue full: {why}")),
        SubmitError::Stopped => Status::unavailable("the model is being unloaded"),
    }
}

/// `INVALID_ARGUMENT` for `Code::InvalidArgument`: the gRPC name of a status code.
fn code_name(code: tonic::Code) -> String {
    let mut out = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or_default()
}

impl InferenceApi {
    pub fn new(models: Arc<ModelManager>, limits: ApiLimits) -> Self {
        Self {
            models,
            inflight: Arc::new(Mutex::new(HashMap::new())),
            limits,
        }
    }

    /// Validate and tokenize `req`; `f` prefixes field names (for batch items).
    fn prepare(
        &self,
        req: pb::GenerateRequest,
        grpc_timeout: Option<Duration>,
        f: &str,
    ) -> Result<Prepared, Status> {
        let arrived = Instant::now();
        let field = |name: &str| format!("{f}{name}");
        let id = if req.request_id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else if req.request_id.len() > 128
            || !req.request_id.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(invalid(
                &field("request_id"),
                "1-128 printable ASCII characters",
            ));
        } else {
            req.request_id.clone()
        };
        if !(-100..=100).contains(&req.priority) {
            return Err(invalid(&field("priority"), "must be in [-100, 100]"));
        }
        let served = self.models.get(&req.model)?;
        let mut prompt = match &req.input {
            None => {
                return Err(invalid(
                    &field("input"),
                    "a prompt, chat or token_ids is required",
                ));
            }
            Some(pb::generate_request::Input::Prompt(p)) => {
                encode(&served, p, true, &field("prompt"))?
            }
            Some(pb::generate_request::Input::Chat(c)) => {
                let text = render_chat(&served, c, &field("chat"))?;
                encode(&served, &text, false, &field("chat"))?
            }
            Some(pb::generate_request::Input::TokenIds(t)) => {
                if let Some(bad) = t.ids.iter().find(|&&i| i as usize >= served.vocab_size) {
                    return Err(invalid(
                        &field("token_ids.ids"),
                        format!(
                            "{bad} is not below the vocabulary size {}",
                            served.vocab_size
                        ),
                    ));
                }
                t.ids.clone()
            }
        };
        if prompt.is_empty() {
            return Err(invalid(&field("input"), "the input has no tokens"));
        }
        let s = req.sampling.clone().unwrap_or_default();
        let sf = |name: &str| field(&format!("sampling.{name}"));
        if let Some(t) = s.truncate_prompt_tokens {
            if t == 0 {
                return Err(invalid(&sf("truncate_prompt_tokens"), "must be >= 1"));
            }
            if prompt.len() > t as usize {
                prompt.drain(..prompt.len() - t as usize);
            }
        }
        let ctx = served.context_length;
        if prompt.len() >= ctx {
            record_rejection(&served.model_ref, "prompt_too_long");
            return Err(invalid(
                &field("input"),
                format!(
                    "the prompt has {} tokens; the model's context is {ctx} (leave room for at least one generated token, or set sampling.truncate_prompt_tokens)",
                    prompt.len()
                ),
            ));
        }
        let engine_cfg = served.engine.config();
        let bs = engine_cfg.block_size;
        let capacity = engine_cfg.num_blocks * bs;
        let n = s.n.unwrap_or(1);
        if !(1..=16).contains(&n) {
            return Err(invalid(&sf("n"), "must be in [1, 16]"));
        }
        let n = n as usize;
        if n * (prompt.len() + 1).div_ceil(bs) > engine_cfg.num_blocks || n > engine_cfg.max_running
        {
            record_rejection(&served.model_ref, "kv_capacity");
            return Err(invalid(
                &field("input"),
                format!(
                    "{n} choice(s) of a {}-token prompt do not fit this replica's KV cache ({capacity} tokens, {} sequences)",
                    prompt.len(),
                    engine_cfg.max_running
                ),
            ));
        }
        let requested = s.max_tokens.unwrap_or(self.limits.default_max_tokens);
        if requested == 0 {
            return Err(invalid(&sf("max_tokens"), "must be >= 1"));
        }
        // Capped by the context and by what one sequence can hold in the cache.
        let max_tokens = (requested as usize)
            .min(ctx - prompt.len())
            .min(capacity - prompt.len());
        let min_tokens = s.min_tokens.unwrap_or(0);
        if min_tokens > requested {
            return Err(invalid(&sf("min_tokens"), "must be <= max_tokens"));
        }
        let temperature = s.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(invalid(&sf("temperature"), "must be in [0, 2]"));
        }
        let top_p = s.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(invalid(&sf("top_p"), "must be in (0, 1]"));
        }
        let min_p = s.min_p.unwrap_or(0.0);
        if !(0.0..=1.0).contains(&min_p) {
            return Err(invalid(&sf("min_p"), "must be in [0, 1]"));
        }
        if s.typical_p.is_some_and(|t| t != 1.0) {
            return Err(invalid(
                &sf("typical_p"),
                "typical sampling is not supported; use top_p or min_p",
            ));
        }
        let repetition_penalty = s.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
            return Err(invalid(&sf("repetition_penalty"), "must be > 0"));
        }
        for (name, v) in [
            ("presence_penalty", s.presence_penalty),
            ("frequency_penalty", s.frequency_penalty),
        ] {
            if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
                return Err(invalid(&sf(name), "must be in [-2, 2]"));
            }
        }
        if s.stop.len() > 16 {
            return Err(invalid(&sf("stop"), "at most 16 stop strings"));
        }
        if let Some(i) = s.stop.iter().position(|x| x.is_empty() || x.len() > 256) {
            return Err(invalid(&sf(&format!("stop[{i}]")), "must be 1-256 bytes"));
        }
        if s.stop_token_ids.len() > 64 {
            return Err(invalid(&sf("stop_token_ids"), "at most 64 ids"));
        }
        if let Some(bad) = s
            .stop_token_ids
            .iter()
            .find(|&&i| i as usize >= served.vocab_size)
        {
            return Err(invalid(
                &sf("stop_token_ids"),
                format!("{bad} is not in the vocabulary"),
            ));
        }
        let top_logprobs = s.top_logprobs.unwrap_or(0);
        if top_logprobs > 20 {
            return Err(invalid(&sf("top_logprobs"), "must be in [0, 20]"));
        }
        if s.prompt_logprobs {
            return Err(invalid(
                &sf("prompt_logprobs"),
                "prompt logprobs are not supported by this replica",
            ));
        }
        if s.skip_special_tokens == Some(false) {
            return Err(invalid(
                &sf("skip_special_tokens"),
                "special tokens are always skipped in text; token ids are returned in `tokens`",
            ));
        }
        if s.logit_bias.len() > 300 {
            return Err(invalid(&sf("logit_bias"), "at most 300 entries"));
        }
        let mut logit_bias = Vec::with_capacity(s.logit_bias.len());
        for (&id, &b) in &s.logit_bias {
            if id as usize >= served.vocab_size || !(-100.0..=100.0).contains(&b) {
                return Err(invalid(
                    &sf("logit_bias"),
                    format!("{id}: ids must be in the vocabulary and biases in [-100, 100]"),
                ));
            }
            logit_bias.push((id, b));
        }
        let format = output_format(s.response_format.as_ref(), &served, &sf)?;
        let deadline = deadline_of(req.deadline.as_ref(), grpc_timeout, arrived)?;
        let seed = s
            .seed
            .unwrap_or_else(|| uuid::Uuid::new_v4().as_u64_pair().0);
        let sampling = SamplingParams {
            temperature,
            top_k: s.top_k.unwrap_or(0) as usize,
            top_p,
            min_p,
            repetition_penalty,
            frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
            presence_penalty: s.presence_penalty.unwrap_or(0.0),
            seed,
            logprobs: s.logprobs,
            top_logprobs: if s.logprobs { top_logprobs as usize } else { 0 },
        };
        let stop = StopConfig {
            eos_token_ids: if s.ignore_eos {
                vec![]
            } else {
                served.eos_token_ids.clone()
            },
            stop_token_ids: s.stop_token_ids.clone(),
            stop_strings: s.stop.clone(),
            max_tokens: Some(max_tokens),
        };
        let span = tracing::Span::current()
            .context()
            .span()
            .span_context()
            .clone();
        Ok(Prepared {
            id: id.clone(),
            prompt_len: prompt.len(),
            n,
            request: Some(EngineRequest {
                id,
                prompt,
                sampling,
                stop,
                min_tokens: min_tokens as usize,
                logit_bias,
                format,
                n,
                priority: req.priority,
                deadline,
                arrived,
                span,
            }),
            served,
            include_stop: s.include_stop_str_in_output,
            logprobs: s.logprobs,
            details: req.return_token_details || s.logprobs,
            arrived,
        })
    }

    /// Queue a prepared request; refuses a duplicate in-flight id.
    fn submit(
        &self,
        p: &mut Prepared,
    ) -> Result<(UnboundedReceiver<Event>, InflightGuard), Status> {
        let id = p.id.clone();
        {
            let mut table = self.inflight.lock().expect("inflight");
            if table.contains_key(&id) {
                return Err(Status::already_exists(format!(
                    "request_id: `{id}` is already in flight"
                )));
            }
            table.insert(id.clone(), p.served.engine.clone());
        }
        let guard = InflightGuard {
            table: self.inflight.clone(),
            id,
        };
        let request = p
            .request
            .take()
            .ok_or_else(|| Status::internal("request submitted twice"))?;
        let rx = p.served.engine.submit(request).map_err(submit_status)?;
        Ok((rx, guard))
    }

    fn token_info(
        served: &Served,
        id: u32,
        logprob: Option<f32>,
        top: &[(u32, f32)],
    ) -> pb::TokenInfo {
        let text = |i: u32| {
            served
                .tokenizer
                .inner
                .decode(&[i], false)
                .unwrap_or_default()
        };
        pb::TokenInfo {
            id,
            text: text(id),
            logprob,
            special: served.special_ids.contains(&id),
            top_logprobs: top
                .iter()
                .map(|&(t, lp)| pb::TokenLogprob {
                    id: t,
                    text: text(t),
                    logprob: lp,
                    special: served.special_ids.contains(&t),
                })
                .collect(),
            raw_bytes: Vec::new(),
        }
    }
}

/// Output of one choice being collected.
#[derive(Default)]
struct ChoiceAcc {
    text: String,
    ids: Vec<u32>,
    tokens: Vec<pb::TokenInfo>,
    finish: Option<Finish>,
    cumulative: f64,
}

/// Request-level timing marks.
#[derive(Default, Clone, Copy)]
struct Marks {
    queue: Option<Duration>,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
}

impl Marks {
    fn timings(&self, arrived: Instant, max_choice_tokens: usize) -> pb::Timings {
        let queue = self.queue.unwrap_or_default();
        let first = self.first.map(|f| f - arrived);
        let last = self
            .last
            .map(|l| l - arrived)
            .unwrap_or_else(|| arrived.elapsed());
        let decode = match (self.first, self.last) {
            (Some(f), Some(l)) => l - f,
            _ => Duration::ZERO,
        };
        pb::Timings {
            queue: Some(duration(queue)),
            prefill: first.map(|f| duration(f.saturating_sub(queue))),
            time_to_first_token: first.map(duration),
            decode: Some(duration(decode)),
            total: Some(duration(last)),
            mean_inter_token_latency: (max_choice_tokens >= 2)
                .then(|| duration(decode / (max_choice_tokens as u32 - 1))),
        }
    }
}

fn finish_fields(
    served: &Served,
    f: &Finish,
    include_stop: bool,
    text: &mut String,
) -> (pb::FinishReason, Option<String>, Option<pb::Failure>) {
    match f {
        Finish::Stop { matched, token } => {
            let matched = match (matched, token) {
                (Some(s), _) => {
                    if include_stop {
                        text.push_str(s);
                    }
                    Some(s.clone())
                }
                (None, Some(t)) => Some(
                    served
                        .tokenizer
                        .inner
                        .decode(&[*t], false)
                        .unwrap_or_default(),
                ),
                (None, None) => None,
            };
            (pb::FinishReason::Stop, matched, None)
        }
        Finish::Length => (pb::FinishReason::Length, None, None),
        Finish::Cancelled => (pb::FinishReason::Cancelled, None, None),
        Finish::DeadlineExceeded => (pb::FinishReason::DeadlineExceeded, None, None),
        Finish::Error(e) => (
            pb::FinishReason::Error,
            None,
            Some(pb::Failure {
                code: "INTERNAL".into(),
                message: e.clone(),
                details: Default::default(),
            }),
        ),
    }
}

impl InferenceApi {
    /// Run a prepared request to the end and build its response.
    async fn collect(&self, mut p: Prepared) -> Result<pb::GenerateResponse, Status> {
        let (mut rx, _guard) = self.submit(&mut p)?;
        let n = p.n;
        let mut choices: Vec<ChoiceAcc> = (0..n).map(|_| ChoiceAcc::default()).collect();
        let mut marks = Marks::default();
        let mut cached = 0;
        let mut open = n;
        while open > 0 {
            let Some(event) = rx.recv().await else {
                return Err(Status::unavailable(
                    "the model was unloaded while generating",
                ));
            };
            match event {
                Event::Admitted {
                    queue,
                    cached_tokens,
                } => {
                    marks.queue = Some(queue);
                    cached = cached_tokens;
                }
                Event::Token {
                    choice,
                    id,
                    text,
                    logprob,
                    top,
                } => {
                    let now = Instant::now();
                    marks.first.get_or_insert(now);
                    marks.last = Some(now);
                    let c = &mut choices[choice as usize];
                    c.text.push_str(&text);
                    c.ids.push(id);
                    c.cumulative += logprob.map_or(0.0, f64::from);
                    if p.details {
                        c.tokens
                            .push(Self::token_info(&p.served, id, logprob, &top));
                    }
                }
                Event::Finished { choice, reason } => {
                    choices[choice as usize].finish = Some(reason);
                    open -= 1;
                }
                Event::Expired => {
                    return Err(Status::deadline_exceeded(
                        "the deadline passed while the request was queued",
                    ));
                }
            }
        }
        let max_len = choices.iter().map(|c| c.ids.len()).max().unwrap_or(0);
        let completion: usize = choices.iter().map(|c| c.ids.len()).sum();
        let choices = choices
            .into_iter()
            .enumerate()
            .map(|(i, mut c)| {
                let finish = c.finish.take().unwrap_or(Finish::Cancelled);
                let (reason, matched_stop, error) =
                    finish_fields(&p.served, &finish, p.include_stop, &mut c.text);
                pb::GenerationChoice {
                    index: i as u32,
                    text: c.text,
                    token_ids: c.ids,
                    finish_reason: reason as i32,
                    matched_stop,
                    tokens: c.tokens,
                    cumulative_logprob: p.logprobs.then_some(c.cumulative),
                    error,
                }
            })
            .collect();
        let prompt_tokens = p.prompt_len as u32;
        Ok(pb::GenerateResponse {
            request_id: p.id.clone(),
            model: Some(p.served.resolved.clone()),
            choices,
            prompt_tokens: Vec::new(),
            usage: Some(pb::Usage {
                prompt_tokens,
                completion_tokens: completion as u32,
                total_tokens: prompt_tokens + completion as u32,
                cached_prompt_tokens: cached as u32,
            }),
            timings: Some(marks.timings(p.arrived, max_len)),
        })
    }

    fn tokenize_input(
        &self,
        model: &str,
        text: Option<&str>,
        chat: Option<&pb::ChatInput>,
        add_special: bool,
    ) -> Result<(Arc<Served>, String, tokenizers::Encoding), Status> {
        let served = self.models.get(model)?;
        let (rendered, special) = match (text, chat) {
            (Some(t), _) => (t.to_string(), add_special),
            (None, Some(c)) => (render_chat(&served, c, "chat")?, false),
            (None, None) => return Err(invalid("input", "text or chat is required")),
        };
        let enc = served
            .tokenizer
            .inner
            .encode(rendered.as_str(), special)
            .map_err(|e| invalid("input", e))?;
        Ok((served, rendered, enc))
    }
}

/// State of one GenerateStream call, carried by `unfold`.
struct StreamState {
    /// Held for its `Drop`: the id leaves the in-flight table when the stream ends.
    _guard: InflightGuard,
    rx: UnboundedReceiver<Event>,
    p: Prepared,
    marks: Marks,
    cached: usize,
    open: usize,
    lengths: Vec<usize>,
    sent_model: bool,
    done: bool,
}

impl StreamState {
    /// The next message to send, or `None` at the end.
    async fn next(&mut self) -> Option<Result<pb::GenerateStreamResponse, Status>> {
        if self.done {
            return None;
        }
        loop {
            let Some(event) = self.rx.recv().await else {
                self.done = true;
                return Some(Err(Status::unavailable(
                    "the model was unloaded while generating",
                )));
            };
            let mut msg = pb::GenerateStreamResponse {
                request_id: self.p.id.clone(),
                ..Default::default()
            };
            match event {
                Event::Admitted {
                    queue,
                    cached_tokens,
                } => {
                    self.marks.queue = Some(queue);
                    self.cached = cached_tokens;
                    continue;
                }
                Event::Token {
                    choice,
                    id,
                    text,
                    logprob,
                    top,
                } => {
                    let now = Instant::now();
                    self.marks.first.get_or_insert(now);
                    self.marks.last = Some(now);
                    self.marks.tokens += 1;
                    self.lengths[choice as usize] += 1;
                    msg.index = choice;
                    msg.text = text;
                    msg.tokens = vec![InferenceApi::token_info(&self.p.served, id, logprob, &top)];
                }
                Event::Finished { choice, reason } => {
                    self.open -= 1;
                    msg.index = choice;
                    let (r, matched, error) =
                        finish_fields(&self.p.served, &reason, self.p.include_stop, &mut msg.text);
                    msg.finish_reason = r as i32;
                    msg.matched_stop = matched;
                    msg.error = error;
                    if self.open == 0 {
                        self.done = true;
                        let prompt = self.p.prompt_len as u32;
                        let completion: usize = self.lengths.iter().sum();
                        msg.usage = Some(pb::Usage {
                            prompt_tokens: prompt,
                            completion_tokens: completion as u32,
                            total_tokens: prompt + completion as u32,
                            cached_prompt_tokens: self.cached as u32,
                        });
                        let max_len = self.lengths.iter().copied().max().unwrap_or(0);
                        msg.timings = Some(self.marks.timings(self.p.arrived, max_len));
                    }
                }
                Event::Expired => {
                    self.done = true;
                    return Some(Err(Status::deadline_exceeded(
                        "the deadline passed while the request was queued",
                    )));
                }
            }
            if !self.sent_model {
                self.sent_model = true;
                msg.model = Some(self.p.served.resolved.clone());
            }
            return Some(Ok(msg));
        }
    }
}

#[tonic::async_trait]
impl InferenceService for InferenceApi {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<pb::GenerateResponse>, Status> {
        let timeout = grpc_timeout(request.metadata());
        let req = request.into_inner();
        let span = tracing::info_span!("inference.generate", request_id = %req.request_id, model = %req.model);
        async move {
            let p = self.prepare(req, timeout, "")?;
            self.collect(p).await.map(Response::new)
        }
        .instrument(span)
        .await
    }

    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<BoxStream<pb::GenerateStreamResponse>>, Status> {
        let timeout = grpc_timeout(request.metadata());
        let req = request.into_inner();
        let span = tracing::info_span!("inference.generate_stream", request_id = %req.request_id, model = %req.model);
        let state = {
            let _e = span.enter();
            let mut p = self.prepare(req, timeout, "")?;
            let (rx, guard) = self.submit(&mut p)?;
            let n = p.n;
            StreamState {
                _guard: guard,
                rx,
                p,
                marks: Marks::default(),
                cached: 0,
                open: n,
                lengths: vec![0; n],
                sent_model: false,
                done: false,
            }
        };
        let stream = futures::stream::unfold(state, |mut st| async move {
            let item = st.next().await?;
            Some((item, st))
        })
        .instrument_stream(span);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn generate_batch(
        &self,
        request: Request<pb::GenerateBatchRequest>,
    ) -> Result<Response<pb::GenerateBatchResponse>, Status> {
        let timeout = grpc_timeout(request.metadata());
        let reqs = request.into_inner().requests;
        if reqs.is_empty() || reqs.len() > 256 {
            return Err(invalid("requests", "1-256 requests"));
        }
        let mut seen = std::collections::HashSet::new();
        for (i, r) in reqs.iter().enumerate() {
            if !r.request_id.is_empty() && !seen.insert(r.request_id.clone()) {
                return Err(invalid(
                    &format!("requests[{i}].request_id"),
                    "request ids must be distinct",
                ));
            }
        }
        let span = tracing::info_span!("inference.generate_batch", requests = reqs.len());
        let _e = span.enter();
        // Validate and submit everything first so the engine admits the batch together.
        let mut pending = Vec::with_capacity(reqs.len());
        for (i, r) in reqs.into_iter().enumerate() {
            let prepared = self.prepare(r, timeout, &format!("requests[{i}]."));
            pending.push(prepared);
        }
        drop(_e);
        let futures = pending.into_iter().map(|p| async move {
            match p {
                Ok(p) => self.collect(p).await,
                Err(e) => Err(e),
            }
        });
        let results = futures::future::join_all(futures).instrument(span).await;
        let items = results
            .into_iter()
            .enumerate()
            .map(|(i, r)| pb::GenerateBatchItem {
                index: i as u32,
                result: Some(match r {
                    Ok(resp) => pb::generate_batch_item::Result::Response(resp),
                    Err(s) => pb::generate_batch_item::Result::Error(pb::Failure {
                        code: code_name(s.code()),
                        message: s.message().to_string(),
                        details: Default::default(),
                    }),
                }),
            })
            .collect();
        Ok(Response::new(pb::GenerateBatchResponse { items }))
    }

    async fn tokenize(
        &self,
        request: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let r = request.into_inner();
        let (text, chat) = match &r.input {
            Some(pb::tokenize_request::Input::Text(t)) => (Some(t.as_str()), None),
            Some(pb::tokenize_request::Input::Chat(c)) => (None, Some(c)),
            None => (None, None),
        };
        let (served, rendered, enc) =
            self.tokenize_input(&r.model, text, chat, r.add_special_tokens.unwrap_or(true))?;
        let tokens = enc
            .get_ids()
            .iter()
            .zip(enc.get_offsets())
            .map(|(&id, &(start, end))| pb::TokenSpan {
                id,
                text: served
                    .tokenizer
                    .inner
                    .decode(&[id], false)
                    .unwrap_or_default(),
                start: start as u32,
                end: end as u32,
                special: served.special_ids.contains(&id),
            })
            .collect();
        Ok(Response::new(pb::TokenizeResponse {
            tokens,
            rendered_text: rendered,
        }))
    }

    async fn count_tokens(
        &self,
        request: Request<pb::CountTokensRequest>,
    ) -> Result<Response<pb::CountTokensResponse>, Status> {
        let r = request.into_inner();
        let (text, chat) = match &r.input {
            Some(pb::count_tokens_request::Input::Text(t)) => (Some(t.as_str()), None),
            Some(pb::count_tokens_request::Input::Chat(c)) => (None, Some(c)),
            None => (None, None),
        };
        let (served, _, enc) = self.tokenize_input(&r.model, text, chat, true)?;
        Ok(Response::new(pb::CountTokensResponse {
            token_count: enc.get_ids().len() as u32,
            context_length: served.context_length as u32,
        }))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListLoadedModelsRequest>,
    ) -> Result<Response<pb::ListLoadedModelsResponse>, Status> {
        Ok(Response::new(pb::ListLoadedModelsResponse {
            models: self.models.list(),
        }))
    }

    async fn abort(
        &self,
        request: Request<pb::AbortRequest>,
    ) -> Result<Response<pb::AbortResponse>, Status> {
        let id = request.into_inner().request_id;
        if id.is_empty() {
            return Err(invalid("request_id", "required"));
        }
        let engine = self.inflight.lock().expect("inflight").get(&id).cloned();
        if let Some(e) = &engine {
            e.abort(&id);
        }
        Ok(Response::new(pb::AbortResponse {
            aborted: engine.is_some(),
        }))
    }

    async fn load_model(
        &self,
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::LoadedModel>, Status> {
        self.models
            .load(request.into_inner())
            .await
            .map(Response::new)
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        if r.model_ref.is_empty() {
            return Err(invalid("model_ref", "required"));
        }
        self.models.unload(&r.model_ref, r.drain)?;
        Ok(Response::new(()))
    }
}

/// Attach a span to every poll of a stream.
trait InstrumentStream: futures::Stream + Sized {
    fn instrument_stream(
        self,
        span: tracing::Span,
    ) -> futures::stream::BoxStream<'static, Self::Item>
    where
        Self: Send + 'static,
    {
        let mut inner = Box::pin(self);
        futures::stream::poll_fn(move |cx| {
            let _e = span.enter();
            inner.as_mut().poll_next(cx)
        })
        .boxed()
    }
}

impl<S: futures::Stream + Sized> InstrumentStream for S {}
