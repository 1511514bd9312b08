//! [`RunError`]: why a training run failed, with the job's failure code and whether another
//! attempt could succeed.

use std::path::PathBuf;

use lmforge_model::ModelError;

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A spec field is out of range or not supported here (`field` is its path in the spec,
    /// e.g. `hyperparameters.max_seq_len`).
    #[error("invalid `{field}`: {message}")]
    Invalid { field: String, message: String },
    /// A dataset file is missing or unreadable.
    #[error("dataset file `{path}`: {message}")]
    DatasetNotFound { path: PathBuf, message: String },
    /// A dataset line cannot be used (1-based `line`).
    #[error("dataset `{path}` line {line}: {message}")]
    Data {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// The base model (or adapter, or tokenizer) directory cannot be loaded.
    #[error("base model `{path}`: {message}")]
    BaseModel { path: PathBuf, message: String },
    /// The checkpoint to resume from does not fit this run or cannot be read.
    #[error("checkpoint `{path}`: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// The training loss (or gradient norm) became NaN or infinite at this optimizer step.
    #[error("non-finite loss at step {step}")]
    NonFiniteLoss { step: u64 },
    /// The device ran out of memory.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// Writing to the run's scratch directory failed.
    #[error("i/o on `{path}`: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The model code failed mid-run (a bug, not bad input).
    #[error("model: {0}")]
    Model(ModelError),
    /// A hook failed (e.g. the checkpoint upload), or something else outside the model.
    #[error("internal: {0}")]
    Internal(String),
}

impl RunError {
    /// One of the failure codes of `job.proto`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } | Self::Data { .. } => "INVALID_SPEC",
            Self::DatasetNotFound { .. } => "DATASET_NOT_FOUND",
            Self::BaseModel { .. } => "BASE_MODEL_NOT_FOUND",
            Self::OutOfMemory(_) => "OUT_OF_MEMORY",
            Self::NonFiniteLoss { .. } => "NON_FINITE_LOSS",
            Self::Checkpoint { .. } | Self::Io { .. } | Self::Model(_) | Self::Internal(_) => {
                "INTERNAL"
            }
        }
    }

    /// Whether another attempt could succeed: true for I/O and hook failures (a full disk, a
    /// download or upload hiccup), false for failures the same inputs reproduce.
    pub fn retryable(&self) -> bool {
        match self {
            Self::DatasetNotFound { .. } | Self::Io { .. } | Self::Internal(_) => true,
            Self::Invalid { .. }
            | Self::Data { .. }
            | Self::BaseModel { .. }
            | Self::Checkpoint { .. }
            | Self::NonFiniteLoss { .. }
            | Self::OutOfMemory(_)
            | Self::Model(_) => false,
        }
    }

    pub(crate) fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A base-model loading failure for the directory `path`.
    pub(crate) fn base(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        Self::BaseModel {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }

    pub(crate) fn checkpoint(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        Self::Checkpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

impl From<ModelError> for RunError {
    fn from(e: ModelError) -> Self {
        let text = e.to_string();
        // candle reports allocation failures as plain errors; CUDA's text names them.
        if text.contains("out of memory") || text.contains("OUT_OF_MEMORY") {
            return Self::OutOfMemory(text);
        }
        match e {
            ModelError::Io { path, source } => Self::Io { path, source },
            other => Self::Model(other),
        }
    }
}

impl From<candle_core::Error> for RunError {
    fn from(e: candle_core::Error) -> Self {
        ModelError::from(e).into()
    }
}
