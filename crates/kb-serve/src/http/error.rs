//! API errors: every failure a client can see, with its HTTP status and a JSON body
//! `{"error": "…"}` ([`ErrorBody`]) that names the request field or server option involved.
//! The backend's own errors are mapped here.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::types::ErrorBody;
use crate::backend::InputError;

/// Seconds a client is told to wait (`Retry-After`) when the server is overloaded or loading.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Everything a request can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a missing field or a value of the wrong type (400).
    #[error("{0}")]
    BadRequest(String),
    /// Missing or wrong API key (401).
    #[error("missing or invalid API key: send `Authorization: Bearer <key>`")]
    Unauthorized,
    /// No such route (404).
    #[error("{0}")]
    NotFound(String),
    /// The body exceeds `--max_body_bytes` (413).
    #[error("request body exceeds the limit of {0} bytes (--max_body_bytes)")]
    PayloadTooLarge(usize),
    /// Well-formed but unacceptable input: empty or over-long query, out-of-range setting (422).
    #[error("{0}")]
    Unprocessable(String),
    /// Queue or concurrency limit reached (503 with `Retry-After`).
    #[error("{0}")]
    Overloaded(String),
    /// The model is still loading and warming up, or the server is shutting down (503 with `Retry-After`).
    #[error("{0}")]
    Unavailable(String),
    /// The request took longer than `--timeout_ms` (504).
    #[error("the request did not finish within {0} ms (--timeout_ms)")]
    Timeout(u64),
    /// Generation failed or the inference worker panicked (500).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Overloaded(_) | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A request's input refused by the backend: 422.
impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        ApiError::Unprocessable(e.0)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut resp = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        let headers = resp.headers_mut();
        match self {
            ApiError::Overloaded(_) | ApiError::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_headers() {
        let r = ApiError::Overloaded("queue full".into()).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        assert_eq!(ApiError::Timeout(5).status(), StatusCode::GATEWAY_TIMEOUT);
        assert!(ApiError::Timeout(5).to_string().contains("--timeout_ms"));
        assert_eq!(
            ApiError::PayloadTooLarge(10).status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert_eq!(
            ApiError::Unauthorized.into_response().headers()[header::WWW_AUTHENTICATE],
            "Bearer"
        );
        assert_eq!(
            ApiError::from(InputError("field `query` is empty".into())).status(),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
}
