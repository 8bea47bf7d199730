//! The serving error type and the one place where errors become HTTP statuses and gRPC codes, so
//! REST and gRPC clients always get the same answer for the same mistake.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// Everything that can go wrong while serving a request or managing models.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ServingError {
    /// The request is malformed or does not fit the model (name, shape, type, parameters).
    #[error("{0}")]
    InvalidInput(String),
    /// No such model or version.
    #[error("{0}")]
    NotFound(String),
    /// The request body is larger than the configured limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The server cannot take the request now (model not ready, being unloaded, shutting down).
    #[error("{0}")]
    Unavailable(String),
    /// The server is too busy for the request now; the client should retry after a pause.
    #[error("{message}")]
    Overloaded { cause: Overload, message: String },
    /// The request waited longer than its timeout.
    #[error("{0}")]
    Timeout(String),
    /// The request asks for something this server does not do.
    #[error("{0}")]
    Unsupported(String),
    /// A model could not be loaded.
    #[error("{0}")]
    LoadFailed(String),
    /// A fault inside the server or the backend.
    #[error("{0}")]
    Internal(String),
    /// The request conflicts with the current state (a deployment already running, a decision
    /// another server made first).
    #[error("{0}")]
    Conflict(String),
}

impl From<crate::traffic::TrafficError> for ServingError {
    fn from(error: crate::traffic::TrafficError) -> Self {
        ServingError::InvalidInput(format!("traffic policy: {error}"))
    }
}

/// Which limit an overloaded request ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// The server-wide limit on requests in flight.
    ConcurrencyLimit,
    /// The model's batching queue (its priority level) is full.
    QueueFull,
}

/// Seconds an overloaded client is told to wait (`Retry-After`, gRPC `retry-after` metadata).
pub const RETRY_AFTER_SECONDS: u32 = 1;

impl ServingError {
    /// A request over `--max-request-bytes`, in the same words on every transport; `what` is
    /// what the transport carries (a REST "body", a gRPC "message").
    pub fn over_request_limit(what: &str, limit: usize) -> Self {
        ServingError::PayloadTooLarge(format!(
            "request {what} is larger than the server's limit of {limit} bytes (--max-request-bytes)"
        ))
    }

    /// Whether the request itself was at fault (bad input, unknown names, too large, asks for
    /// what is not served), rather than the server or the model.
    pub fn is_clients_fault(&self) -> bool {
        matches!(
            self,
            ServingError::InvalidInput(_)
                | ServingError::NotFound(_)
                | ServingError::PayloadTooLarge(_)
                | ServingError::Unsupported(_)
                | ServingError::Conflict(_)
        )
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            ServingError::InvalidInput(_) | ServingError::LoadFailed(_) => StatusCode::BAD_REQUEST,
            ServingError::Unsupported(_) => StatusCode::NOT_IMPLEMENTED,
            ServingError::NotFound(_) => StatusCode::NOT_FOUND,
            ServingError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServingError::Unavailable(_) | ServingError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ServingError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ServingError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ServingError::Conflict(_) => StatusCode::CONFLICT,
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ServingError::InvalidInput(_) | ServingError::LoadFailed(_) => {
                tonic::Code::InvalidArgument
            }
            ServingError::NotFound(_) => tonic::Code::NotFound,
            ServingError::PayloadTooLarge(_) => tonic::Code::ResourceExhausted,
            ServingError::Unavailable(_) | ServingError::Overloaded { .. } => {
                tonic::Code::Unavailable
            }
            ServingError::Timeout(_) => tonic::Code::DeadlineExceeded,
            ServingError::Unsupported(_) => tonic::Code::Unimplemented,
            ServingError::Internal(_) => tonic::Code::Internal,
            ServingError::Conflict(_) => tonic::Code::Aborted,
        }
    }

    /// The reason label used in metrics for a failed request.
    pub fn reason(&self) -> &'static str {
        match self {
            ServingError::InvalidInput(_) => "invalid_input",
            ServingError::NotFound(_) => "not_found",
            ServingError::PayloadTooLarge(_) => "too_large",
            ServingError::Unavailable(_) => "unavailable",
            ServingError::Overloaded {
                cause: Overload::ConcurrencyLimit,
                ..
            } => "concurrency_limit",
            ServingError::Overloaded {
                cause: Overload::QueueFull,
                ..
            } => "queue_full",
            ServingError::Timeout(_) => "timeout",
            ServingError::Unsupported(_) => "unsupported",
            ServingError::LoadFailed(_) => "load_failed",
            ServingError::Internal(_) => "internal",
            ServingError::Conflict(_) => "conflict",
        }
    }
}

impl ServingError {
    /// What a request whose handler panicked is answered (500 / INTERNAL). The panic's message
    /// may hold internals (paths, values, other requests' data), so it goes to the log under an
    /// incident id and the client gets only that id; the transport counts it.
    pub fn from_panic(panic: &(dyn std::any::Any + Send)) -> Self {
        let message = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let incident = uuid::Uuid::new_v4();
        tracing::error!(%incident, %message, "a request handler panicked");
        ServingError::Internal(format!(
            "the server failed on this request (incident {incident}; its log has the details)"
        ))
    }
}

impl From<crate::tensor::TensorError> for ServingError {
    fn from(error: crate::tensor::TensorError) -> Self {
        ServingError::InvalidInput(error.0)
    }
}

/// REST errors carry Triton's body, `{"error": "<message>"}`, which tritonclient reads.
impl IntoResponse for ServingError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.to_string() });
        self.response_with(body)
    }
}

impl ServingError {
    /// The error as `/v1/embeddings` answers it: OpenAI's body, the same status.
    pub fn openai_response(self, param: Option<&str>) -> Response {
        let body = self.openai_body(param);
        self.response_with(body)
    }

    fn response_with(self, body: serde_json::Value) -> Response {
        let mut response = (self.http_status(), axum::Json(body)).into_response();
        if matches!(self, ServingError::Overloaded { .. }) {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(RETRY_AFTER_SECONDS),
            );
        }
        response
    }

    /// OpenAI's error body (`/v1/embeddings`): `type` and `code` from the status, `param` the
    /// request field the error is about, if known.
    fn openai_body(&self, param: Option<&str>) -> serde_json::Value {
        let (kind, code) = match self.http_status() {
            StatusCode::NOT_FOUND => ("invalid_request_error", Some("model_not_found")),
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => ("server_error", None),
            status if status.is_client_error() => ("invalid_request_error", None),
            _ => ("server_error", None),
        };
        serde_json::json!({
            "error": {"message": self.to_string(), "type": kind, "param": param, "code": code}
        })
    }
}

impl From<ServingError> for tonic::Status {
    fn from(error: ServingError) -> Self {
        let mut status = tonic::Status::new(error.grpc_code(), error.to_string());
        if matches!(error, ServingError::Overloaded { .. }) {
            status.metadata_mut().insert(
                "retry-after",
                tonic::metadata::MetadataValue::from(RETRY_AFTER_SECONDS),
            );
        }
        status
    }
}
