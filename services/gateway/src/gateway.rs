//! The request pipeline shared by the HTTP and gRPC fronts:
//! authenticate → check limits → route → model permission → rate limit → input filter →
//! canned answer, or preset expansion and history trimming → cache → merged generation →
//! output filter → token charge and route counters.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use lmforge_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use crate::cache::{ResponseCache, cache_key};
use crate::error::GatewayError;
use crate::filter::{FilterPolicy, StreamFilter};
use crate::keys::{ApiKey, KeyStore};
use crate::limits::RateLimiter;
use crate::routing::{Action, Decision, RoutingTable};
use crate::stats::{Outcome, RouteStats};
use crate::types::{ChoiceOut, GenOutput, GenRequest, Input, Message, Provenance, StreamEvent};
use crate::upstream::{self, Upstream};

/// Request limits (violations → 400 naming the field).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_messages: usize,
    pub max_tokens: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_messages: 256,
            max_tokens: 4096,
        }
    }
}

/// Everything a request needs, shared by all of them.
pub struct Gateway {
    pub keys: KeyStore,
    pub limiter: RateLimiter,
    pub routing: RoutingTable,
    pub cache: ResponseCache,
    pub upstream: Upstream,
    pub stats: RouteStats,
    pub limits: Limits,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").finish_non_exhaustive()
    }
}

/// A model as `/v1/models` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    pub id: String,
    pub created: i64,
    pub owned_by: String,
    pub resolved_model: String,
    pub context_length: u32,
}

/// A request after routing and admission.
struct Admitted {
    key: Arc<ApiKey>,
    request: GenRequest,
    decision: Decision,
    request_id: String,
    started: Instant,
}

/// A streamed answer: events until `End` (or `Error`).
pub type EventStream = mpsc::Receiver<StreamEvent>;

const ROLES: [&str; 5] = ["system", "user", "assistant", "developer", "tool"];

/// Checks every bounded field; the error names the first bad one.
pub fn validate(request: &GenRequest, limits: &Limits) -> Result<(), GatewayError> {
    if request.model.is_empty() {
        return Err(GatewayError::invalid("model", "`model` is required"));
    }
    match &request.input {
        Input::Chat(messages) => {
            if messages.is_empty() {
                return Err(GatewayError::invalid(
                    "messages",
                    "at least one message is required",
                ));
            }
            if messages.len() > limits.max_messages {
                return Err(GatewayError::invalid(
                    "messages",
                    format!("at most {} messages are allowed", limits.max_messages),
                ));
            }
            for (i, m) in messages.iter().enumerate() {
                if !ROLES.contains(&m.role.as_str()) {
                    return Err(GatewayError::invalid(
                        format!("messages[{i}].role"),
                        format!(
                            "unknown role `{}`; expected one of {}",
                            m.role,
                            ROLES.join(", ")
                        ),
                    ));
                }
            }
        }
        Input::Text(prompt) => {
            if prompt.is_empty() {
                return Err(GatewayError::invalid(
                    "prompt",
                    "`prompt` must not be empty",
                ));
            }
        }
    }
    if let Some(max) = request.max_tokens {
        if max == 0 {
            return Err(GatewayError::invalid("max_tokens", "must be at least 1"));
        }
        if max > limits.max_tokens {
            return Err(GatewayError::invalid(
                "max_tokens",
                format!("must be at most {} on this gateway", limits.max_tokens),
            ));
        }
    }
    if request
        .temperature
        .is_some_and(|t| !(0.0..=2.0).contains(&t))
    {
        return Err(GatewayError::invalid("temperature", "must be in [0, 2]"));
    }
    if request.top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return Err(GatewayError::invalid("top_p", "must be in (0, 1]"));
    }
    if !(1..=16).contains(&request.n) {
        return Err(GatewayError::invalid("n", "must be in [1, 16]"));
    }
    if request.stop.len() > 16 {
        return Err(GatewayError::invalid("stop", "at most 16 stop strings"));
    }
    for (field, value) in [
        ("presence_penalty", request.presence_penalty),
        ("frequency_penalty", request.frequency_penalty),
    ] {
        if value.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
            return Err(GatewayError::invalid(field, "must be in [-2, 2]"));
        }
    }
    if request.top_logprobs.is_some_and(|k| k > 20) {
        return Err(GatewayError::invalid("top_logprobs", "must be in [0, 20]"));
    }
    if request.user.chars().count() > 256 {
        return Err(GatewayError::invalid("user", "at most 256 characters"));
    }
    if request
        .logit_bias
        .values()
        .any(|b| !(-100.0..=100.0).contains(b))
    {
        return Err(GatewayError::invalid(
            "logit_bias",
            "biases must be in [-100, 100]",
        ));
    }
    Ok(())
}

impl Gateway {
    /// Authenticates an `Authorization` header value.
    pub async fn authenticate(&self, header: Option<&str>) -> Result<Arc<ApiKey>, GatewayError> {
        self.keys.authenticate(header).await
    }

    async fn admit(
        &self,
        key: Arc<ApiKey>,
        mut request: GenRequest,
    ) -> Result<Admitted, GatewayError> {
        validate(&request, &self.limits)?;
        let routing = self.routing.get();
        let decision = routing.decide(
            &request.model,
            request.input.routing_text(),
            request.input.total_chars(),
            &key.name,
        )?;
        if !key.may_use(&request.model) {
            return Err(GatewayError::PermissionDenied(format!(
                "this API key may not use the model `{}`",
                request.model
            )));
        }
        if let Err(error) = self.limiter.admit(
            key.id,
            key.requests_per_minute.max(0) as u32,
            key.tokens_per_minute.max(0) as u32,
        ) {
            self.stats.rate_limited(&decision.route);
            return Err(error);
        }
        if let Some(filter) = decision.filter.as_ref().filter(|f| f.inputs) {
            let text = match &request.input {
                Input::Text(prompt) => prompt.clone(),
                Input::Chat(messages) => messages
                    .iter()
                    .map(|m| m.content.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            };
            if !filter.check(&text).is_empty() {
                return Err(GatewayError::ContentFiltered);
            }
        }
        if let Some(name) = request.preset.clone() {
            let preset = routing.preset(&name).ok_or_else(|| {
                GatewayError::invalid("preset", format!("unknown preset `{name}`"))
            })?;
            expand_preset(&mut request.input, preset);
        }
        if let (Some(budget), Action::Targets(targets), Input::Chat(messages)) = (
            decision.max_input_tokens,
            &decision.action,
            &mut request.input,
        ) {
            self.trim_history(messages, budget, &targets[0]).await?;
        }
        Ok(Admitted {
            key,
            request,
            decision,
            request_id: uuid::Uuid::new_v4().simple().to_string(),
            started: Instant::now(),
        })
    }

    /// Drops the oldest non-system turns until the chat fits `budget` tokens, keeping the
    /// system messages and the latest turn.
    async fn trim_history(
        &self,
        messages: &mut Vec<Message>,
        budget: u32,
        target: &str,
    ) -> Result<(), GatewayError> {
        loop {
            let count = self.upstream.count_chat_tokens(target, messages).await?;
            if count <= budget {
                return Ok(());
            }
            let turns: Vec<usize> = (0..messages.len())
                .filter(|&i| messages[i].role != "system" && messages[i].role != "developer")
                .collect();
            if turns.len() <= 1 {
                return Err(GatewayError::invalid(
                    "messages",
                    format!("the latest turn alone is {count} tokens, over the budget of {budget}"),
                ));
            }
            messages.remove(turns[0]);
            // A history starting with an assistant turn loses it too.
            if let Some(&next) = turns.get(1)
                && messages[next - 1].role == "assistant"
                && turns.len() > 2
            {
                messages.remove(next - 1);
            }
        }
    }

    fn finish(&self, admitted: &Admitted, outcome: Outcome) {
        if !outcome.error {
            self.limiter.charge_tokens(
                admitted.key.id,
                admitted.key.tokens_per_minute.max(0) as u32,
                outcome.prompt_tokens + outcome.completion_tokens,
            );
        }
        self.stats.end(&admitted.decision.route, outcome);
    }

    /// A whole answer.
    pub async fn complete(
        &self,
        key: Arc<ApiKey>,
        request: GenRequest,
    ) -> Result<GenOutput, GatewayError> {
        let admitted = self.admit(key, request).await?;
        self.stats
            .begin(&admitted.decision.route, &admitted.request.model);
        let result = self.generate(&admitted).await;
        let latency = admitted.started.elapsed();
        match result {
            Ok((mut output, target)) => {
                output.provenance.request_id = admitted.request_id.clone();
                apply_filter(&mut output, admitted.decision.filter.as_deref());
                self.finish(
                    &admitted,
                    Outcome {
                        cache_hit: output.provenance.cache_hit,
                        filtered: output.provenance.filtered,
                        prompt_tokens: output.prompt_tokens,
                        completion_tokens: output.completion_tokens,
                        target,
                        latency,
                        ..Default::default()
                    },
                );
                Ok(output)
            }
            Err(error) => {
                self.finish(
                    &admitted,
                    Outcome {
                        error: true,
                        latency,
                        ..Default::default()
                    },
                );
                Err(error)
            }
        }
    }

    /// The raw (unfiltered) answer and the target that generated it.
    async fn generate(&self, a: &Admitted) -> Result<(GenOutput, Option<String>), GatewayError> {
        let targets = match &a.decision.action {
            Action::Canned(text) => return Ok((canned(a, text), None)),
            Action::Targets(targets) => targets.clone(),
        };
        if !a.request.is_deterministic() || a.request.no_cache {
            let (out, target) = self
                .upstream
                .generate(&a.request, &targets, &a.request_id, &a.decision.route)
                .await?;
            return Ok((out, Some(target)));
        }
        let key = cache_key(&a.request, &a.decision.route, &targets);
        if let Some(hit) = self.cache.get(&key).await {
            let mut out = (*hit).clone();
            out.provenance.cache_hit = true;
            out.provenance.upstream.clear();
            return Ok((out, None));
        }
        let upstream = self.upstream.clone();
        let request = a.request.clone();
        let (request_id, route) = (a.request_id.clone(), a.decision.route.clone());
        let flight_targets = targets.clone();
        let cache = self.cache.clone();
        let flight_key = key.clone();
        let (result, merged) = self
            .cache
            .single_flight(&key, move || {
                async move {
                    let (mut out, target) = upstream
                        .generate(&request, &flight_targets, &request_id, &route)
                        .await?;
                    out.provenance.target = target;
                    cache.insert(flight_key, Arc::new(out.clone())).await;
                    Ok(out)
                }
                // Whichever merged request polls the shared flight, the upstream call is in
                // the trace of the request that started it.
                .instrument(tracing::Span::current())
                .boxed()
            })
            .await;
        let out = (*result?).clone();
        let target = (!merged).then(|| out.provenance.target.clone());
        Ok((out, target))
    }

    /// A streamed answer. Errors before the first token (routing, limits, every target down)
    /// are returned here; later ones arrive as [`StreamEvent::Error`].
    pub async fn stream(
        self: &Arc<Self>,
        key: Arc<ApiKey>,
        request: GenRequest,
    ) -> Result<EventStream, GatewayError> {
        let admitted = self.admit(key, request).await?;
        self.stats
            .begin(&admitted.decision.route, &admitted.request.model);
        let (events_tx, events_rx) = mpsc::channel(64);
        let targets = match &admitted.decision.action {
            Action::Canned(text) => {
                let out = canned(&admitted, text);
                tokio::spawn(
                    replay(self.clone(), admitted, out, events_tx)
                        .instrument(tracing::Span::current()),
                );
                return Ok(events_rx);
            }
            Action::Targets(targets) => targets.clone(),
        };
        let cache_key = (admitted.request.is_deterministic() && !admitted.request.no_cache)
            .then(|| cache_key(&admitted.request, &admitted.decision.route, &targets));
        if let Some(key) = &cache_key
            && let Some(hit) = self.cache.get(key).await
        {
            let mut out = (*hit).clone();
            out.provenance.cache_hit = true;
            out.provenance.upstream.clear();
            tokio::spawn(
                replay(self.clone(), admitted, out, events_tx).instrument(tracing::Span::current()),
            );
            return Ok(events_rx);
        }
        let started = match self
            .upstream
            .stream(&admitted.request, &targets, &admitted.request_id)
            .await
        {
            Ok(started) => started,
            Err(error) => {
                self.finish(
                    &admitted,
                    Outcome {
                        error: true,
                        latency: admitted.started.elapsed(),
                        ..Default::default()
                    },
                );
                return Err(error);
            }
        };
        // The relay stays in the request's span (and trace) after this returns.
        tokio::spawn(
            pump(self.clone(), admitted, started, cache_key, events_tx)
                .instrument(tracing::Span::current()),
        );
        Ok(events_rx)
    }

    /// Models the key may use: the routing file's public names, and the models loaded on
    /// inference when model references are allowed.
    pub async fn list_models(&self, key: &ApiKey) -> Vec<ModelInfo> {
        let routing = self.routing.get();
        let now = crate::types::unix_now();
        let mut models: Vec<ModelInfo> = routing
            .public_models()
            .into_iter()
            .map(|(id, context_length)| ModelInfo {
                id,
                created: now,
                owned_by: "lmforge".to_owned(),
                resolved_model: String::new(),
                context_length,
            })
            .collect();
        let mut client = self.upstream.client();
        if routing.spec.allow_model_refs
            && let Ok(Ok(loaded)) = tokio::time::timeout(
                Duration::from_secs(2),
                client.list_models(pb::ListLoadedModelsRequest {}),
            )
            .await
        {
            for m in loaded.into_inner().models {
                if m.state != pb::LoadedModelState::Ready as i32 {
                    continue;
                }
                let resolved = m.resolved.as_ref();
                models.push(ModelInfo {
                    id: m.model_ref.clone(),
                    created: m.loaded_at.map_or(now, |t| t.seconds),
                    owned_by: "lmforge".to_owned(),
                    resolved_model: resolved
                        .map(|r| format!("{}/{}", r.name, r.version))
                        .unwrap_or_default(),
                    context_length: m.context_length,
                });
            }
        }
        models.retain(|m| key.may_use(&m.id));
        models
    }
}

fn expand_preset(input: &mut Input, preset: &crate::routing::PresetSpec) {
    match input {
        Input::Chat(messages) => {
            let mut head = Vec::new();
            let own_system = messages
                .first()
                .filter(|m| m.role == "system" || m.role == "developer")
                .cloned();
            if own_system.is_some() {
                messages.remove(0);
            }
            let system = match (&preset.system, own_system) {
                (Some(p), Some(own)) => Some(format!("{p}\n\n{}", own.content)),
                (Some(p), None) => Some(p.clone()),
                (None, own) => own.map(|m| m.content),
            };
            if let Some(content) = system {
                head.push(Message {
                    role: "system".into(),
                    content,
                    name: None,
                });
            }
            for example in &preset.examples {
                head.push(Message {
                    role: "user".into(),
                    content: example.user.clone(),
                    name: None,
                });
                head.push(Message {
                    role: "assistant".into(),
                    content: example.assistant.clone(),
                    name: None,
                });
            }
            messages.splice(0..0, head);
        }
        Input::Text(prompt) => {
            let mut head = preset
                .system
                .clone()
                .map(|s| format!("{s}\n\n"))
                .unwrap_or_default();
            for example in &preset.examples {
                head.push_str(&format!("{}\n{}\n\n", example.user, example.assistant));
            }
            prompt.insert_str(0, &head);
        }
    }
}

fn canned(a: &Admitted, text: &str) -> GenOutput {
    GenOutput {
        choices: (0..a.request.n)
            .map(|index| ChoiceOut {
                index,
                text: text.to_owned(),
                finish_reason: "stop".to_owned(),
                logprobs: None,
            })
            .collect(),
        prompt_tokens: 0,
        completion_tokens: 0,
        provenance: Provenance {
            request_id: a.request_id.clone(),
            route: a.decision.route.clone(),
            resolved_model: "canned".to_owned(),
            ..Default::default()
        },
    }
}

/// Filters every choice of a whole answer.
pub fn apply_filter(output: &mut GenOutput, filter: Option<&FilterPolicy>) {
    let Some(filter) = filter else { return };
    let mut rules = Vec::new();
    for choice in &mut output.choices {
        let filtered = filter.apply(&choice.text);
        if filtered.refused {
            choice.finish_reason = "content_filter".to_owned();
        }
        if !filtered.rules.is_empty() {
            choice.logprobs = choice
                .logprobs
                .take()
                .filter(|_| filter.action == crate::filter::FilterAction::Flag);
        }
        choice.text = filtered.text;
        rules.extend(filtered.rules);
    }
    rules.sort();
    rules.dedup();
    output.provenance.filtered = !rules.is_empty();
    output.provenance.filter_rules = rules;
}

/// Sends a finished answer as stream events.
async fn replay(
    gateway: Arc<Gateway>,
    a: Admitted,
    mut out: GenOutput,
    events_tx: mpsc::Sender<StreamEvent>,
) {
    out.provenance.request_id = a.request_id.clone();
    apply_filter(&mut out, a.decision.filter.as_deref());
    let _ = events_tx
        .send(StreamEvent::Start(out.provenance.clone()))
        .await;
    for choice in &out.choices {
        let _ = events_tx
            .send(StreamEvent::Delta {
                index: choice.index,
                text: choice.text.clone(),
                logprobs: choice.logprobs.clone(),
            })
            .await;
        let _ = events_tx
            .send(StreamEvent::Finish {
                index: choice.index,
                finish_reason: choice.finish_reason.clone(),
            })
            .await;
    }
    let _ = events_tx
        .send(StreamEvent::End {
            prompt_tokens: out.prompt_tokens,
            completion_tokens: out.completion_tokens,
            provenance: out.provenance.clone(),
        })
        .await;
    gateway.finish(
        &a,
        Outcome {
            cache_hit: out.provenance.cache_hit,
            filtered: out.provenance.filtered,
            prompt_tokens: out.prompt_tokens,
            completion_tokens: out.completion_tokens,
            latency: a.started.elapsed(),
            ..Default::default()
        },
    );
}

/// Relays an upstream stream through the filter; a finished deterministic stream fills the
/// cache. Ends early (cancelling generation) when the client goes away.
async fn pump(
    gateway: Arc<Gateway>,
    a: Admitted,
    mut started: upstream::UpstreamStream,
    cache_key: Option<String>,
    events_tx: mpsc::Sender<StreamEvent>,
) {
    let policy = a.decision.filter.clone();
    let mut filters: HashMap<u32, StreamFilter<'_>> = HashMap::new();
    let mut raw: HashMap<u32, (String, Option<String>)> = HashMap::new();
    let mut provenance = Provenance {
        request_id: a.request_id.clone(),
        ..Default::default()
    };
    let mut sent_start = false;
    let mut refused: HashMap<u32, bool> = HashMap::new();
    let mut usage = pb::Usage::default();
    let mut failed = false;
    loop {
        let message = match started.stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => break,
            Err(status) => {
                let _ = events_tx
                    .send(StreamEvent::Error(GatewayError::from_upstream(
                        &status,
                        &a.request.model,
                    )))
                    .await;
                failed = true;
                break;
            }
        };
        if !sent_start {
            provenance = Provenance {
                request_id: a.request_id.clone(),
                ..upstream::provenance(message.model.as_ref(), &a.decision.route, &started.upstream)
            };
            sent_start = true;
            if events_tx
                .send(StreamEvent::Start(provenance.clone()))
                .await
                .is_err()
            {
                failed = true;
                break;
            }
        }
        let index = message.index;
        let entry = raw.entry(index).or_default();
        if cache_key.is_some() {
            entry.0.push_str(&message.text);
        }
        let done = message.finish_reason != pb::FinishReason::Unspecified as i32;
        if done {
            entry.1 = Some(upstream::finish_reason(message.finish_reason).to_owned());
        }
        let logprobs = a
            .request
            .logprobs
            .then(|| upstream::logprobs(&message.tokens));
        let (mut text, mut blocked) = (message.text.clone(), false);
        if !refused.get(&index).copied().unwrap_or(false) {
            if let Some(policy) = policy.as_deref() {
                let filter = filters
                    .entry(index)
                    .or_insert_with(|| StreamFilter::new(policy));
                let mut emit = filter.push(&message.text);
                if done && !emit.refused {
                    let rest = filter.finish();
                    emit.text.push_str(&rest.text);
                    emit.refused = rest.refused;
                }
                text = emit.text;
                blocked = emit.refused;
            }
            if blocked {
                refused.insert(index, true);
            }
            let sent =
                (!text.is_empty() || logprobs.as_ref().is_some_and(|l| !l.is_empty())).then(|| {
                    StreamEvent::Delta {
                        index,
                        text,
                        logprobs: logprobs.filter(|_| !blocked),
                    }
                });
            if let Some(event) = sent
                && events_tx.send(event).await.is_err()
            {
                failed = true;
                break;
            }
            if blocked || done {
                let finish_reason = if blocked {
                    "content_filter".to_owned()
                } else {
                    upstream::finish_reason(message.finish_reason).to_owned()
                };
                if events_tx
                    .send(StreamEvent::Finish {
                        index,
                        finish_reason,
                    })
                    .await
                    .is_err()
                {
                    failed = true;
                    break;
                }
            }
        }
        if let Some(u) = message.usage {
            usage = u;
        }
    }
    let mut rules: Vec<String> = filters
        .values()
        .flat_map(|f| f.fired.iter().cloned())
        .collect();
    rules.sort();
    rules.dedup();
    provenance.filtered = !rules.is_empty();
    provenance.filter_rules = rules;
    if !failed {
        let _ = events_tx
            .send(StreamEvent::End {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                provenance: provenance.clone(),
            })
            .await;
        let complete = raw.len() == a.request.n as usize && raw.values().all(|(_, f)| f.is_some());
        if let (Some(key), true) = (cache_key, complete) {
            let mut choices: Vec<ChoiceOut> = raw
                .into_iter()
                .map(|(index, (text, finish))| ChoiceOut {
                    index,
                    text,
                    finish_reason: finish.unwrap_or_default(),
                    logprobs: None,
                })
                .collect();
            choices.sort_by_key(|c| c.index);
            // Logprobs are not kept from streams: only cache what a replay can reproduce.
            if !a.request.logprobs {
                let out = GenOutput {
                    choices,
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                    provenance: Provenance {
                        filtered: false,
                        filter_rules: Vec::new(),
                        ..provenance.clone()
                    },
                };
                gateway.cache.insert(key, Arc::new(out)).await;
            }
        }
    }
    gateway.finish(
        &a,
        Outcome {
            error: failed,
            filtered: provenance.filtered,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            target: Some(started.target.clone()),
            latency: a.started.elapsed(),
            ..Default::default()
        },
    );
}
