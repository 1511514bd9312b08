//! Calls to the inference service: the request conversion, and unary and streamed generation
//! over a decision's targets in order, falling back to the next when one is overloaded
//! (RESOURCE_EXHAUSTED), down (UNAVAILABLE) or does not serve the model (NOT_FOUND).
//! Every call gets a `grpc.client` span under the current one and sends its `traceparent`,
//! so inference continues the request's trace.

use lmforge_proto::v1 as pb;
use lmforge_proto::v1::inference_service_client::InferenceServiceClient;
use lmforge_telemetry::propagation::{TracedChannel, traced_channel};

use crate::error::GatewayError;
use crate::types::{
    ChoiceOut, GenOutput, GenRequest, Input, Message, Provenance, ResponseFormat, TokenLogprob,
};

/// The inference service.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: InferenceServiceClient<TracedChannel>,
    address: String,
}

/// A started upstream stream and what it is.
pub struct UpstreamStream {
    pub stream: tonic::Streaming<pb::GenerateStreamResponse>,
    pub target: String,
    pub upstream: String,
}

impl Upstream {
    /// A lazily connecting client of `endpoint`.
    pub fn new(endpoint: tonic::transport::Endpoint) -> Self {
        let address = endpoint.uri().to_string();
        let channel = endpoint
            .connect_timeout(std::time::Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        Self {
            client: InferenceServiceClient::new(traced_channel(channel))
                .max_decoding_message_size(64 << 20),
            address,
        }
    }

    /// The raw client (token counting, model lists).
    pub fn client(&self) -> InferenceServiceClient<TracedChannel> {
        self.client.clone()
    }

    /// Generates with the first target that can; `request_id` becomes the inference id.
    /// Returns the answer and the target that gave it.
    pub async fn generate(
        &self,
        request: &GenRequest,
        targets: &[String],
        request_id: &str,
        route: &str,
    ) -> Result<(GenOutput, String), GatewayError> {
        let mut last = GatewayError::Unavailable("no target".to_owned());
        for (attempt, target) in targets.iter().enumerate() {
            let id = attempt_id(request_id, attempt);
            match self
                .client
                .clone()
                .generate(to_proto(request, target, &id))
                .await
            {
                Ok(response) => {
                    let out = from_proto(request, response.into_inner(), route, &self.address);
                    return Ok((out, target.clone()));
                }
                Err(status) => {
                    last = GatewayError::from_upstream(&status, &request.model);
                    if !last.is_retryable_elsewhere() {
                        return Err(last);
                    }
                    metrics::counter!("gateway_fallbacks_total").increment(1);
                    tracing::warn!(model_ref = %target, code = ?status.code(), "target failed, trying the next");
                }
            }
        }
        Err(last)
    }

    /// Starts a stream with the first target that accepts it.
    pub async fn stream(
        &self,
        request: &GenRequest,
        targets: &[String],
        request_id: &str,
    ) -> Result<UpstreamStream, GatewayError> {
        let mut last = GatewayError::Unavailable("no target".to_owned());
        for (attempt, target) in targets.iter().enumerate() {
            let id = attempt_id(request_id, attempt);
            match self
                .client
                .clone()
                .generate_stream(to_proto(request, target, &id))
                .await
            {
                Ok(response) => {
                    return Ok(UpstreamStream {
                        stream: response.into_inner(),
                        target: target.clone(),
                        upstream: self.address.clone(),
                    });
                }
                Err(status) => {
                    last = GatewayError::from_upstream(&status, &request.model);
                    if !last.is_retryable_elsewhere() {
                        return Err(last);
                    }
                    metrics::counter!("gateway_fallbacks_total").increment(1);
                }
            }
        }
        Err(last)
    }

    /// Counts the tokens of a chat as `target` renders it.
    pub async fn count_chat_tokens(
        &self,
        target: &str,
        messages: &[Message],
    ) -> Result<u32, GatewayError> {
        let response = self
            .client
            .clone()
            .count_tokens(pb::CountTokensRequest {
                model: target.to_owned(),
                input: Some(pb::count_tokens_request::Input::Chat(chat_input(messages))),
            })
            .await
            .map_err(|s| GatewayError::from_upstream(&s, target))?;
        Ok(response.into_inner().token_count)
    }
}

/// Inference request ids must be unique among in-flight requests: fallbacks get a suffix.
fn attempt_id(request_id: &str, attempt: usize) -> String {
    if attempt == 0 {
        request_id.to_owned()
    } else {
        format!("{request_id}.{attempt}")
    }
}

fn role(role: &str) -> pb::ChatRole {
    match role {
        "system" | "developer" => pb::ChatRole::System,
        "assistant" => pb::ChatRole::Assistant,
        "tool" => pb::ChatRole::Tool,
        _ => pb::ChatRole::User,
    }
}

fn chat_input(messages: &[Message]) -> pb::ChatInput {
    pb::ChatInput {
        messages: messages
            .iter()
            .map(|m| pb::ChatMessage {
                role: role(&m.role) as i32,
                content: m.content.clone(),
                name: m.name.clone(),
            })
            .collect(),
        add_generation_prompt: Some(true),
        chat_template: String::new(),
    }
}

/// The inference request for `request` on `target`.
pub fn to_proto(request: &GenRequest, target: &str, request_id: &str) -> pb::GenerateRequest {
    let input = match &request.input {
        Input::Chat(messages) => pb::generate_request::Input::Chat(chat_input(messages)),
        Input::Text(prompt) => pb::generate_request::Input::Prompt(prompt.clone()),
    };
    let format = match &request.response_format {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(pb::ResponseFormat {
            r#type: pb::ResponseFormatType::JsonObject as i32,
            json_schema: String::new(),
        }),
        ResponseFormat::JsonSchema { schema, .. } => Some(pb::ResponseFormat {
            r#type: pb::ResponseFormatType::JsonSchema as i32,
            json_schema: schema.to_string(),
        }),
    };
    pb::GenerateRequest {
        request_id: request_id.to_owned(),
        model: target.to_owned(),
        input: Some(input),
        sampling: Some(pb::SamplingParams {
            max_tokens: request.max_tokens,
            temperature: request.temperature.map(|t| t as f32),
            top_p: request.top_p.map(|p| p as f32),
            top_k: request.top_k,
            min_p: request.min_p.map(|p| p as f32),
            repetition_penalty: request.repetition_penalty.map(|p| p as f32),
            presence_penalty: request.presence_penalty.map(|p| p as f32),
            frequency_penalty: request.frequency_penalty.map(|p| p as f32),
            stop: request.stop.clone(),
            stop_token_ids: request.stop_token_ids.clone(),
            ignore_eos: request.ignore_eos,
            // OpenAI seeds are signed; the engine's are not: keep the bits.
            seed: request.seed.map(|s| s as u64),
            n: Some(request.n),
            logprobs: request.logprobs,
            top_logprobs: request.top_logprobs,
            logit_bias: request
                .logit_bias
                .iter()
                .map(|(k, v)| (*k, *v as f32))
                .collect(),
            response_format: format,
            ..Default::default()
        }),
        return_token_details: request.logprobs,
        ..Default::default()
    }
}

/// OpenAI's finish_reason for the engine's.
pub fn finish_reason(reason: i32) -> &'static str {
    match pb::FinishReason::try_from(reason).unwrap_or(pb::FinishReason::Unspecified) {
        pb::FinishReason::Stop => "stop",
        pb::FinishReason::Length | pb::FinishReason::DeadlineExceeded => "length",
        pb::FinishReason::ContentFilter => "content_filter",
        pb::FinishReason::Cancelled => "cancelled",
        pb::FinishReason::Error => "error",
        pb::FinishReason::Unspecified => "stop",
    }
}

/// Logprobs of output tokens.
pub fn logprobs(tokens: &[pb::TokenInfo]) -> Vec<TokenLogprob> {
    tokens
        .iter()
        .map(|t| TokenLogprob {
            token: t.text.clone(),
            logprob: f64::from(t.logprob.unwrap_or(0.0)),
            bytes: t.raw_bytes.clone(),
            top: t
                .top_logprobs
                .iter()
                .map(|a| {
                    (
                        a.text.clone(),
                        f64::from(a.logprob),
                        a.text.as_bytes().to_vec(),
                    )
                })
                .collect(),
        })
        .collect()
}

/// The provenance of an answer by `model`.
pub fn provenance(model: Option<&pb::ResolvedModel>, route: &str, upstream: &str) -> Provenance {
    Provenance {
        route: route.to_owned(),
        resolved_model: model
            .map(|m| format!("{}/{}", m.name, m.version))
            .unwrap_or_default(),
        model_digest: model.map(|m| m.digest.clone()).unwrap_or_default(),
        upstream: upstream.to_owned(),
        ..Default::default()
    }
}

fn from_proto(
    request: &GenRequest,
    response: pb::GenerateResponse,
    route: &str,
    upstream: &str,
) -> GenOutput {
    let usage = response.usage.unwrap_or_default();
    let echo = match (&request.input, request.echo) {
        (Input::Text(prompt), true) => prompt.as_str(),
        _ => "",
    };
    GenOutput {
        choices: response
            .choices
            .into_iter()
            .map(|c| ChoiceOut {
                index: c.index,
                text: format!("{echo}{}", c.text),
                finish_reason: finish_reason(c.finish_reason).to_owned(),
                logprobs: request.logprobs.then(|| logprobs(&c.tokens)),
            })
            .collect(),
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        provenance: Provenance {
            request_id: response.request_id,
            ..provenance(response.model.as_ref(), route, upstream)
        },
    }
}
