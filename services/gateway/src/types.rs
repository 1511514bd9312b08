//! Domain types shared by the HTTP and gRPC fronts: one generation request (chat or text) and
//! its outcome. Both fronts convert into these at the edge and render from them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::GatewayError;

/// A chat message after role normalisation (`developer` → `system`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Chat messages or a raw prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Input {
    Chat(Vec<Message>),
    Text(String),
}

impl Input {
    /// The text routing rules and the auto-router look at: the last user turn, or the prompt.
    pub fn routing_text(&self) -> &str {
        match self {
            Input::Text(prompt) => prompt,
            Input::Chat(messages) => messages
                .iter()
                .rev()
                .find(|m| m.role == "user")
                .map(|m| m.content.as_str())
                .unwrap_or_default(),
        }
    }

    /// Every input character (for the auto-router's length feature and token estimates).
    pub fn total_chars(&self) -> usize {
        match self {
            Input::Text(prompt) => prompt.chars().count(),
            Input::Chat(messages) => messages.iter().map(|m| m.content.chars().count()).sum(),
        }
    }
}

/// OpenAI `response_format`, validated; the engine constrains decoding to it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum ResponseFormat {
    #[default]
    Text,
    /// JSON mode: one JSON object.
    JsonObject,
    /// Structured output: a JSON value valid under `schema` (`name` is informational).
    JsonSchema {
        name: String,
        schema: serde_json::Value,
    },
}

impl ResponseFormat {
    /// `response_format.type` and, for `json_schema`, its `name` and `schema`.
    pub fn parse(
        kind: &str,
        json_schema: Option<(String, Option<serde_json::Value>)>,
    ) -> Result<Self, GatewayError> {
        let format = match kind {
            "" | "text" => Self::Text,
            "json_object" => Self::JsonObject,
            "json_schema" => {
                let Some((name, schema)) = json_schema else {
                    return Err(GatewayError::invalid(
                        "response_format.json_schema",
                        "required when `type` is `json_schema`",
                    ));
                };
                if name.is_empty()
                    || name.len() > 64
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(GatewayError::invalid(
                        "response_format.json_schema.name",
                        "must be 1-64 characters of a-z, A-Z, 0-9, `_` and `-`",
                    ));
                }
                // No schema: any JSON value, as JSON Schema reads `{}`.
                let schema = schema.unwrap_or_else(|| serde_json::json!({}));
                if !schema.is_object() {
                    return Err(GatewayError::invalid(
                        "response_format.json_schema.schema",
                        "must be a JSON Schema object",
                    ));
                }
                return Ok(Self::JsonSchema { name, schema });
            }
            other => {
                return Err(GatewayError::invalid(
                    "response_format.type",
                    format!(
                        "`{other}` is not supported; use `text`, `json_object` or `json_schema`"
                    ),
                ));
            }
        };
        if json_schema.is_some() {
            return Err(GatewayError::invalid(
                "response_format.json_schema",
                "only allowed when `type` is `json_schema`",
            ));
        }
        Ok(format)
    }
}

/// One request, validated. Field names and meanings are OpenAI's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenRequest {
    pub model: String,
    pub input: Input,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub n: u32,
    pub stop: Vec<String>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: BTreeMap<u32, f64>,
    /// Chat: `logprobs: true`; text: `logprobs: k` (then `top_logprobs = k`).
    pub logprobs: bool,
    pub top_logprobs: Option<u32>,
    pub seed: Option<i64>,
    pub response_format: ResponseFormat,
    pub top_k: Option<u32>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// Text completions: prepend the prompt to the output.
    pub echo: bool,
    /// Extension: a named preset expanded server-side.
    pub preset: Option<String>,
    /// Not part of the cache key.
    #[serde(skip)]
    pub user: String,
    #[serde(skip)]
    pub no_cache: bool,
    #[serde(skip)]
    pub include_usage: bool,
}

impl GenRequest {
    /// A request with OpenAI's defaults.
    pub fn new(model: impl Into<String>, input: Input) -> Self {
        Self {
            model: model.into(),
            input,
            max_tokens: None,
            temperature: None,
            top_p: None,
            n: 1,
            stop: Vec::new(),
            presence_penalty: None,
            frequency_penalty: None,
            logit_bias: BTreeMap::new(),
            logprobs: false,
            top_logprobs: None,
            seed: None,
            response_format: ResponseFormat::Text,
            top_k: None,
            min_p: None,
            repetition_penalty: None,
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            echo: false,
            preset: None,
            user: String::new(),
            no_cache: false,
            include_usage: false,
        }
    }

    /// Whether the same request always gets the same answer (greedy, or a fixed seed), so
    /// that it may be cached and merged.
    pub fn is_deterministic(&self) -> bool {
        self.temperature == Some(0.0) || self.seed.is_some()
    }

    /// Whether this is a chat request.
    pub fn is_chat(&self) -> bool {
        matches!(self.input, Input::Chat(_))
    }
}

/// Logprob of one output token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Vec<u8>,
    pub top: Vec<(String, f64, Vec<u8>)>,
}

/// One finished choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceOut {
    pub index: u32,
    pub text: String,
    /// OpenAI's value: `stop`, `length`, `content_filter`, `cancelled`, `error`.
    pub finish_reason: String,
    pub logprobs: Option<Vec<TokenLogprob>>,
}

/// Where an answer came from and what the gateway did to it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub request_id: String,
    pub route: String,
    pub resolved_model: String,
    pub model_digest: String,
    pub upstream: String,
    /// Model reference of the route target that generated (for per-target counters).
    #[serde(default)]
    pub target: String,
    pub cache_hit: bool,
    pub filtered: bool,
    pub filter_rules: Vec<String>,
}

impl Provenance {
    /// `fp_` + 12 hex chars of the digest (OpenAI's `system_fingerprint`).
    pub fn fingerprint(&self) -> String {
        let digest: String = self.model_digest.chars().take(12).collect();
        format!("fp_{digest}")
    }
}

/// A whole answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenOutput {
    pub choices: Vec<ChoiceOut>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub provenance: Provenance,
}

/// One event of a streamed answer.
#[derive(Debug, Clone)]
pub enum StreamEvent {
    /// The first event: where the answer comes from.
    Start(Provenance),
    /// Text to append to a choice.
    Delta {
        index: u32,
        text: String,
        logprobs: Option<Vec<TokenLogprob>>,
    },
    /// A choice ended.
    Finish { index: u32, finish_reason: String },
    /// Generation failed mid-stream.
    Error(crate::error::GatewayError),
    /// The stream ended; token counts and the final filter verdict.
    End {
        prompt_tokens: u32,
        completion_tokens: u32,
        provenance: Provenance,
    },
}

/// Unix seconds now.
pub fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}
