//! OpenAI-style error responses: `{"error": {"message", "type", "param", "code"}}` with the
//! status OpenAI's API gives for the same fault.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// A request that could not be answered, as the client will see it.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `rate_limit_error`,
    /// `server_error`.
    pub kind: &'static str,
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable reason (`model_not_found`, `context_length_exceeded`...).
    pub code: Option<&'static str>,
    /// Seconds to wait before retrying (sent as `Retry-After`).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// 400: the request is wrong in `param`.
    pub fn invalid(param: Option<&str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: param.map(str::to_string),
            code: None,
            retry_after: None,
        }
    }

    /// The same error with a `code`.
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The same error with another status.
    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// 404 for a model name that is not one of ours.
    pub fn model_not_found(model: &str) -> Self {
        ApiError::invalid(
            Some("model"),
            format!(
                "The model '{model}' does not exist: use 'stancemix' or 'stancemix:BLEND' \
                 (BLEND as in the CLI's --blend: dial=D, mix=A, expert=NAME, auto=POLICY, ...); \
                 GET /v1/models lists them"
            ),
        )
        .code("model_not_found")
        .status(StatusCode::NOT_FOUND)
    }

    /// 401 for a missing or wrong API key.
    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            kind: "authentication_error",
            message: "Missing or incorrect API key: send 'Authorization: Bearer KEY' with the key \
                      the server was started with (--api-key)"
                .into(),
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }

    /// 429 when every slot and queue place is taken.
    pub fn busy(retry_after: u64) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            kind: "rate_limit_error",
            message: "The server is at capacity (every decoding slot busy and the queue full); \
                      retry after the number of seconds in Retry-After"
                .into(),
            param: None,
            code: Some("queue_full"),
            retry_after: Some(retry_after),
        }
    }

    /// 500 for a fault of ours.
    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}
