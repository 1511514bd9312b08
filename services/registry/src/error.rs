//! The registry's errors and their one mapping to gRPC status codes.

use lmforge_store::StoreError;

/// Everything a registry operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Bad input: `field` names the request field.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field at fault.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The thing to create exists already.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The operation does not fit the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Postgres or the artifact store does not answer.
    #[error("{0} is unavailable, retry later")]
    Unavailable(&'static str),
    /// An unexpected database error (logged in full, answered without SQL text).
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// An unexpected storage error.
    #[error("artifact storage error: {0}")]
    Storage(String),
}

impl RegistryError {
    /// Shorthand for [`RegistryError::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }
}

impl From<sqlx::Error> for RegistryError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable("the registry database"),
            sqlx::Error::RowNotFound => Self::NotFound("row".to_owned()),
            _ => Self::Database(error),
        }
    }
}

impl From<StoreError> for RegistryError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::SizeMismatch { .. } | StoreError::DigestMismatch { .. } => {
                Self::invalid("chunk", error.to_string())
            }
            StoreError::BadDigest(_) => Self::invalid("sha256", error.to_string()),
            StoreError::OffsetPastEnd { .. } => Self::invalid("offset", error.to_string()),
            StoreError::BadUrl { .. } => Self::invalid("uri", error.to_string()),
            StoreError::NotFound(what) => Self::NotFound(what),
            StoreError::Upload(reason) => Self::invalid("chunk", reason),
            StoreError::Backend(reason) => Self::Storage(reason),
        }
    }
}

impl From<RegistryError> for tonic::Status {
    fn from(error: RegistryError) -> Self {
        use tonic::Code;
        let message = error.to_string();
        match error {
            RegistryError::InvalidArgument { field, reason } => {
                let mut details = tonic_types::ErrorDetails::new();
                details.add_bad_request_violation(field, reason);
                <tonic::Status as tonic_types::StatusExt>::with_error_details(
                    Code::InvalidArgument,
                    message,
                    details,
                )
            }
            RegistryError::NotFound(_) => Self::new(Code::NotFound, message),
            RegistryError::AlreadyExists(_) => Self::new(Code::AlreadyExists, message),
            RegistryError::FailedPrecondition(_) => Self::new(Code::FailedPrecondition, message),
            RegistryError::Unavailable(_) => Self::new(Code::Unavailable, message),
            RegistryError::Database(source) => {
                tracing::error!(error = %source, "registry database error");
                Self::new(Code::Internal, message)
            }
            RegistryError::Storage(reason) => {
                tracing::error!(%reason, "artifact storage error");
                Self::new(Code::Internal, "artifact storage error")
            }
        }
    }
}

/// Result of registry operations.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
