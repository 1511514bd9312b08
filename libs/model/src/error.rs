//! The crate's one error type.
//!
//! Every variant names what went wrong in terms a user can act on: the tensor, the config
//! field, the architecture or the file.

use std::path::PathBuf;

/// Errors from loading, running, training and saving models.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(
        "unsupported architecture `{0}` (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
    )]
    UnsupportedArchitecture(String),
    #[error("invalid config field `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("missing tensor `{0}` in checkpoint")]
    MissingTensor(String),
    #[error("tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    WrongShape {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("checkpoint file `{path}`: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("i/o on `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("json in `{path}`: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("kv cache: {0}")]
    KvCache(String),
    #[error("invalid input `{field}`: {reason}")]
    InvalidInput { field: &'static str, reason: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn json(path: impl Into<PathBuf>, source: serde_json::Error) -> Self {
        Self::Json {
            path: path.into(),
            source,
        }
    }
    pub(crate) fn input(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidInput {
            field,
            reason: reason.into(),
        }
    }
}
