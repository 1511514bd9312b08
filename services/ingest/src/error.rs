//! The ingest service's errors and their one mapping to gRPC status codes.

use lmforge_store::StoreError;

use crate::pipeline::PipelineError;

/// Everything an ingest operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Bad input: `field` names the request field.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field at fault.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The operation does not fit the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A dependency (Postgres, the store, the registry, inference) does not answer.
    #[error("{0} is unavailable, retry later")]
    Unavailable(String),
    /// An unexpected database error (logged in full, answered without SQL text).
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// An unexpected storage or local file error.
    #[error("storage error")]
    Storage(String),
}

impl IngestError {
    /// Shorthand for [`IngestError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<sqlx::Error> for IngestError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable("the ingest database".into()),
            sqlx::Error::RowNotFound => Self::NotFound("row".to_owned()),
            _ => Self::Database(error),
        }
    }
}

impl From<StoreError> for IngestError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::SizeMismatch { .. } => {
                Self::invalid("metadata.expected_size_bytes", error.to_string())
            }
            StoreError::DigestMismatch { .. } | StoreError::BadDigest(_) => {
                Self::invalid("metadata.expected_sha256", error.to_string())
            }
            StoreError::OffsetPastEnd { .. } => Self::invalid("offset", error.to_string()),
            StoreError::BadUrl { .. } => Self::invalid("uri", error.to_string()),
            StoreError::NotFound(what) => Self::NotFound(what),
            StoreError::Upload(reason) => Self::invalid("chunk", reason),
            StoreError::Backend(reason) => Self::Storage(reason),
        }
    }
}

impl From<PipelineError> for IngestError {
    fn from(error: PipelineError) -> Self {
        match error {
            PipelineError::Format(crate::parse::FormatError::Io(e)) | PipelineError::Io(e) => {
                Self::Storage(e.to_string())
            }
            PipelineError::Format(e) => Self::invalid("metadata.format", e.to_string()),
            e @ PipelineError::TooManyParseErrors { .. } => Self::invalid(
                "metadata.config.parse.max_parse_error_fraction",
                e.to_string(),
            ),
            e @ PipelineError::Empty(_) => Self::invalid("chunk", e.to_string()),
            PipelineError::Rewrite(reason) => {
                Self::Unavailable(format!("inference (augment.rewrite: {reason})"))
            }
        }
    }
}

impl From<IngestError> for tonic::Status {
    fn from(error: IngestError) -> Self {
        use tonic::Code;
        let message = error.to_string();
        match error {
            IngestError::InvalidArgument { field, reason } => {
                let mut details = tonic_types::ErrorDetails::new();
                details.add_bad_request_violation(field, reason);
                <tonic::Status as tonic_types::StatusExt>::with_error_details(
                    Code::InvalidArgument,
                    message,
                    details,
                )
            }
            IngestError::NotFound(_) => Self::new(Code::NotFound, message),
            IngestError::FailedPrecondition(_) => Self::new(Code::FailedPrecondition, message),
            IngestError::Unavailable(_) => Self::new(Code::Unavailable, message),
            IngestError::Database(source) => {
                tracing::error!(error = %source, "ingest database error");
                Self::new(Code::Internal, message)
            }
            IngestError::Storage(reason) => {
                tracing::error!(%reason, "ingest storage error");
                Self::new(Code::Internal, message)
            }
        }
    }
}

/// Result of ingest operations.
pub type Result<T, E = IngestError> = std::result::Result<T, E>;
