//! The route handlers.

use axum::extract::State;
use axum::http::{header, HeaderValue, Method, Uri};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::error::ApiError;
use super::state::SharedState;
use super::types::{
    Admitted, BatchSize, ErrorBody, JsonBody, KeywordResult, KeywordsRequest, KeywordsResponse,
    SeedRequest, SeedResponse, StatusBody,
};
use crate::queue::JobResult;

/// Adds the batching details of `job` to a response, as headers and as a [`BatchSize`] extension.
fn with_batch_info(body: impl IntoResponse, job: &JobResult) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert("x-batch-size", HeaderValue::from(job.batch_size));
    h.insert(
        "x-queue-time-ms",
        HeaderValue::from(job.queue_time.as_millis() as u64),
    );
    h.insert(
        "x-inference-time-ms",
        HeaderValue::from(job.inference_time.as_millis() as u64),
    );
    resp.extensions_mut().insert(BatchSize(job.batch_size));
    resp
}

/// Extracts keywords from one prompt (the original Flask server's route and contract).
#[utoipa::path(
    post,
    path = "/keyword_extract",
    tag = "keywords",
    request_body(content = SeedRequest, description = "Accepted with any Content-Type, as the original client sent it"),
    responses(
        (status = 200, description = "Keywords as one comma-separated string", body = SeedResponse),
        (status = 400, description = "Malformed JSON or missing `prompt`", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Body over --max_body_bytes", body = ErrorBody),
        (status = 422, description = "Empty or over-long prompt", body = ErrorBody),
        (status = 500, description = "Generation failed", body = ErrorBody),
        (status = 503, description = "Queue full, too many requests or model loading (see Retry-After)", body = ErrorBody),
        (status = 504, description = "Over --timeout_ms", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn keyword_extract(
    State(st): State<SharedState>,
    Extension(Admitted(started)): Extension<Admitted>,
    JsonBody(req): JsonBody<SeedRequest>,
) -> Result<Response, ApiError> {
    let info = st.ready_model()?;
    let params = info.defaults;
    let deadline = started + st.timeout();
    let (mut queries, job) = st
        .infer(
            info,
            vec![req.prompt],
            params,
            |_| "`prompt`".into(),
            deadline,
        )
        .await?;
    let result = job
        .outputs
        .first()
        .map(|o| o.text.clone())
        .unwrap_or_default();
    let body = SeedResponse {
        prompt: queries.pop().unwrap_or_default(),
        result,
    };
    Ok(with_batch_info(Json(body), &job))
}

/// Extracts keywords from one query or a list of queries.
#[utoipa::path(
    post,
    path = "/v1/keywords",
    tag = "keywords",
    request_body = KeywordsRequest,
    responses(
        (status = 200, description = "Keywords per query", body = KeywordsResponse),
        (status = 400, description = "Malformed JSON, wrong type, or neither `query` nor `queries`", body = ErrorBody),
        (status = 401, description = "Missing or wrong API key", body = ErrorBody),
        (status = 413, description = "Body over --max_body_bytes", body = ErrorBody),
        (status = 422, description = "Empty or over-long query, too many queries, or a setting out of range", body = ErrorBody),
        (status = 500, description = "Generation failed", body = ErrorBody),
        (status = 503, description = "Queue full, too many requests or model loading (see Retry-After)", body = ErrorBody),
        (status = 504, description = "Over --timeout_ms", body = ErrorBody),
    ),
    security((), ("bearer" = []))
)]
pub async fn keywords(
    State(st): State<SharedState>,
    Extension(Admitted(started)): Extension<Admitted>,
    JsonBody(req): JsonBody<KeywordsRequest>,
) -> Result<Response, ApiError> {
    let (queries, field): (Vec<String>, fn(usize) -> String) = match (req.query, req.queries) {
        (Some(_), Some(_)) => {
            return Err(ApiError::Unprocessable(
                "give either field `query` or field `queries`, not both".into(),
            ))
        }
        (Some(q), None) => (vec![q], |_| "`query`".into()),
        (None, Some(qs)) => (qs, |i| format!("`queries[{i}]`")),
        (None, None) => {
            return Err(ApiError::BadRequest(
                "missing field `query` (or `queries`)".into(),
            ))
        }
    };
    let info = st.ready_model()?;
    if queries.is_empty() {
        return Err(ApiError::Unprocessable("field `queries` is empty".into()));
    }
    if queries.len() > info.max_client_batch_size {
        return Err(ApiError::Unprocessable(format!(
            "field `queries` has {} queries; the limit is {} (--max_client_batch_size)",
            queries.len(),
            info.max_client_batch_size
        )));
    }
    let params = info.params(req.num_beams, req.max_length, req.grounded)?;
    let model = info.name.clone();
    let deadline = started + st.timeout();
    let (queries, job) = st.infer(info, queries, params, field, deadline).await?;
    let results = queries
        .into_iter()
        .zip(&job.outputs)
        .map(|(query, out)| KeywordResult {
            query,
            keywords: out.keywords.clone(),
            text: out.text.clone(),
        })
        .collect();
    let body = KeywordsResponse {
        results,
        model,
        elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
    };
    Ok(with_batch_info(Json(body), &job))
}

/// Liveness: 200 as long as the process serves HTTP.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "The process is up", body = StatusBody)))]
pub async fn health() -> Json<StatusBody> {
    Json(StatusBody {
        status: "ok".into(),
        model: None,
    })
}

/// Readiness: 200 once the model is loaded and warmed up, 503 before and while shutting down.
#[utoipa::path(get, path = "/ready", tag = "operations",
    responses(
        (status = 200, description = "Ready to serve keyword requests", body = StatusBody),
        (status = 503, description = "Loading or shutting down", body = ErrorBody),
    ))]
pub async fn ready(State(st): State<SharedState>) -> Result<Json<StatusBody>, ApiError> {
    if st.is_shutting_down() {
        return Err(ApiError::Unavailable("the server is shutting down".into()));
    }
    let info = st.ready_model()?;
    Ok(Json(StatusBody {
        status: "ready".into(),
        model: Some(info.name.clone()),
    }))
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain")))]
pub async fn metrics(State(st): State<SharedState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(&st.sample()),
    )
        .into_response()
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3 document", body = Object)))]
pub async fn openapi_json(State(st): State<SharedState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        st.openapi().to_string(),
    )
        .into_response()
}

/// Any other route: 404 naming it.
pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}
