//! The gateway's error type and its two renderings: OpenAI's HTTP error object (status,
//! `type`, `param`, `code`) and a `tonic::Status` for the gRPC mirror.

use std::time::Duration;

/// Everything a gateway request can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// Bad input; `param` names the field (`messages[0].role`, `max_tokens`, `body`).
    #[error("{message}")]
    InvalidRequest { param: String, message: String },
    /// No, malformed, unknown, expired or revoked API key.
    #[error("{0}")]
    Unauthenticated(String),
    /// The key may not use this model (or is not an admin key).
    #[error("{0}")]
    PermissionDenied(String),
    /// Unknown model name.
    #[error("the model `{0}` does not exist or is not served")]
    ModelNotFound(String),
    /// Unknown object (API key id).
    #[error("{0}")]
    NotFound(String),
    /// A rate limit of the key; retry after the given time.
    #[error("rate limit reached ({limit}); retry in {}s", retry_after.as_secs_f64().ceil())]
    RateLimited {
        limit: &'static str,
        retry_after: Duration,
    },
    /// The input was refused by the compliance filter.
    #[error("the input was refused by the content policy")]
    ContentFiltered,
    /// Every target of the route is down or overloaded.
    #[error("the model is unavailable: {0}")]
    Unavailable(String),
    /// Anything else (database, unexpected upstream answers); never leaks internals.
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    /// Bad input naming `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            param: param.into(),
            message: message.into(),
        }
    }

    /// HTTP status, OpenAI error `type` and `code`.
    pub fn http_parts(&self) -> (u16, &'static str, Option<&'static str>) {
        match self {
            Self::InvalidRequest { .. } => (400, "invalid_request_error", None),
            Self::ContentFiltered => (400, "invalid_request_error", Some("content_filter")),
            Self::Unauthenticated(_) => (401, "authentication_error", Some("invalid_api_key")),
            Self::PermissionDenied(_) => (403, "permission_error", Some("model_not_allowed")),
            Self::ModelNotFound(_) => (404, "invalid_request_error", Some("model_not_found")),
            Self::NotFound(_) => (404, "invalid_request_error", Some("not_found")),
            Self::RateLimited { .. } => (429, "rate_limit_error", Some("rate_limit_exceeded")),
            Self::Unavailable(_) => (503, "server_error", Some("model_unavailable")),
            Self::Internal(_) => (500, "server_error", None),
        }
    }

    /// The offending field, when there is one.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. } => Some(param),
            Self::ModelNotFound(_) | Self::PermissionDenied(_) => Some("model"),
            _ => None,
        }
    }

    /// OpenAI's error object as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        let (_, kind, code) = self.http_parts();
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": kind,
                "param": self.param(),
                "code": code,
            }
        })
    }

    /// The protobuf error object (failed batch items).
    pub fn to_proto(&self) -> lmforge_proto::v1::OpenAiError {
        let (_, kind, code) = self.http_parts();
        lmforge_proto::v1::OpenAiError {
            message: self.to_string(),
            r#type: kind.to_owned(),
            param: self.param().unwrap_or_default().to_owned(),
            code: code.unwrap_or_default().to_owned(),
        }
    }

    /// Maps a status from the inference service.
    pub fn from_upstream(status: &tonic::Status, model: &str) -> Self {
        use tonic::Code;
        match status.code() {
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                let param = tonic_types::StatusExt::get_details_bad_request(status)
                    .and_then(|b| b.field_violations.into_iter().next())
                    .map(|v| v.field)
                    .unwrap_or_default();
                // Inference names sampling fields `sampling.<OpenAI name>`; its other field
                // names (`chat`, `prompt`, …) are not the client's, so they are left out.
                let param = param
                    .strip_prefix("sampling.")
                    .map(str::to_owned)
                    .unwrap_or_default();
                let message = status.message();
                let message = message.strip_prefix("sampling.").unwrap_or(message);
                Self::invalid(param, message.to_owned())
            }
            Code::NotFound => Self::ModelNotFound(model.to_owned()),
            Code::ResourceExhausted => Self::Unavailable("overloaded".to_owned()),
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted => {
                Self::Unavailable(status.code().description().to_owned())
            }
            _ => Self::Internal(format!("inference answered {}", status.code())),
        }
    }

    /// Whether another target may succeed where this one failed (fallback).
    pub fn is_retryable_elsewhere(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::ModelNotFound(_))
    }
}

impl From<sqlx::Error> for GatewayError {
    fn from(error: sqlx::Error) -> Self {
        tracing::warn!(%error, "database error");
        Self::Internal("database unavailable".to_owned())
    }
}

impl From<GatewayError> for tonic::Status {
    fn from(error: GatewayError) -> Self {
        use tonic_types::{ErrorDetails, StatusExt};
        let message = error.to_string();
        match error {
            GatewayError::InvalidRequest { param, message } => tonic::Status::with_error_details(
                tonic::Code::InvalidArgument,
                message.clone(),
                ErrorDetails::with_bad_request_violation(param, message),
            ),
            GatewayError::ContentFiltered => tonic::Status::invalid_argument(message),
            GatewayError::Unauthenticated(_) => tonic::Status::unauthenticated(message),
            GatewayError::PermissionDenied(_) => tonic::Status::permission_denied(message),
            GatewayError::ModelNotFound(_) | GatewayError::NotFound(_) => {
                tonic::Status::not_found(message)
            }
            GatewayError::RateLimited { retry_after, .. } => {
                let mut status = tonic::Status::resource_exhausted(message);
                if let Ok(value) = retry_after.as_secs().max(1).to_string().parse() {
                    status.metadata_mut().insert("retry-after", value);
                }
                status
            }
            GatewayError::Unavailable(_) => tonic::Status::unavailable(message),
            GatewayError::Internal(_) => tonic::Status::internal(message),
        }
    }
}
