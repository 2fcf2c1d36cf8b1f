//! Request and response bodies (with their OpenAPI schemas), the JSON body extractor, and the
//! request extensions the middleware and handlers share.

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::state::SharedState;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, naming the field or option involved.
    #[schema(example = "field `query` is empty")]
    pub error: String,
}

/// `POST /keyword_extract` body: the original server's contract.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct SeedRequest {
    /// The text to extract keywords from.
    #[schema(example = "이사화물 통관예약을 하면 뭐가 좋나요?")]
    pub prompt: String,
}

/// `POST /keyword_extract` answer.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct SeedResponse {
    /// The prompt as received.
    pub prompt: String,
    /// The generated keywords as one comma-separated string, e.g. `"kw1, kw2"`.
    pub result: String,
}

/// `POST /v1/keywords` body: give `query` or `queries`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
pub struct KeywordsRequest {
    /// One query.
    #[schema(example = "이사화물 통관예약을 하면 뭐가 좋나요?")]
    pub query: Option<String>,
    /// Several queries, answered in order (at most --max_client_batch_size).
    pub queries: Option<Vec<String>>,
    /// Beam count for this request (1 to --max_num_beams; default --num_beams).
    #[schema(minimum = 1)]
    pub num_beams: Option<usize>,
    /// Decoder length limit counting the start token (2 to --max_length; default --max_length).
    #[schema(minimum = 2)]
    pub max_length: Option<usize>,
    /// Grounded decoding: every keyword a span of its query (whitespace ignored) or a derived
    /// term (default --grounded; needs the server's derived terms).
    pub grounded: Option<bool>,
}

/// Keywords of one query.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct KeywordResult {
    /// The query as received.
    pub query: String,
    /// Keywords in the model's order, deduplicated.
    pub keywords: Vec<String>,
    /// The generated text (special tokens skipped).
    pub text: String,
}

/// `POST /v1/keywords` answer.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct KeywordsResponse {
    /// One result per query, in request order.
    pub results: Vec<KeywordResult>,
    /// The model serving the request (as given to --model).
    pub model: String,
    /// Time the server spent on the request, in milliseconds.
    pub elapsed_ms: f64,
}

/// `GET /health` and `GET /ready` answer.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct StatusBody {
    /// `ok` (health) or `ready`.
    pub status: String,
    /// The model (on `/ready`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// Size of the batch a request ran in, attached to responses for the access log.
#[derive(Debug, Clone, Copy)]
pub struct BatchSize(pub usize);

/// When the keyword-route guard admitted a request: its `--timeout_ms` runs from here, reading
/// the body included.
#[derive(Debug, Clone, Copy)]
pub struct Admitted(pub Instant);

/// A JSON request body, parsed whatever the `Content-Type` (the original client sent JSON as
/// plain text). Every failure becomes a JSON error: 413 over the body limit, 504 when the body
/// has not arrived within the request's time limit, 400 otherwise.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<SharedState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &SharedState) -> Result<Self, ApiError> {
        let admitted = req
            .extensions()
            .get::<Admitted>()
            .map_or_else(Instant::now, |a| a.0);
        let read = Bytes::from_request(req, state);
        let bytes = tokio::time::timeout_at((admitted + state.timeout()).into(), read)
            .await
            .map_err(|_| state.timeout_error())?
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(state.max_body_bytes())
                } else {
                    ApiError::BadRequest(format!("cannot read the request body: {}", e.body_text()))
                }
            })?;
        decode(&bytes).map(JsonBody)
    }
}

/// Decodes a request body: a JSON object deserializing into `T`, or a 400 naming what is wrong.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest(
            "the request body is empty; expected a JSON object".into(),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::BadRequest(format!(
            "invalid type: the body is a JSON {}, expected a JSON object",
            json_kind(&value)
        )));
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::BadRequest(format!("invalid request: {}", e.inner()))
        } else {
            ApiError::BadRequest(format!("invalid field `{path}`: {}", e.inner()))
        }
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}
