//! The HTTP layer: axum handlers, the JSON body extractor, middleware (authentication and
//! concurrency guard, JSON errors, metrics and access log) and the OpenAPI document.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::{oneshot, Semaphore};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::backend::{GenParams, ModelInfo};
use crate::cli::Args;
use crate::error::{ApiError, ErrorBody};
use crate::metrics::Metrics;
use crate::queue::{Job, JobError, JobResult, Queue, SubmitError};

/// State shared by every handler.
#[derive(Debug)]
pub struct AppState {
    model: OnceLock<Arc<ModelInfo>>,
    queue: Queue,
    /// Server metrics.
    pub metrics: Arc<Metrics>,
    concurrency: Arc<Semaphore>,
    max_concurrent: usize,
    api_key: Option<String>,
    timeout: Duration,
    max_body_bytes: usize,
    shutting_down: AtomicBool,
    openapi: String,
}

/// The state as handlers receive it.
pub type SharedState = Arc<AppState>;

impl AppState {
    /// State for a server started with `args`, feeding `queue`.
    pub fn new(args: &Args, queue: Queue, metrics: Arc<Metrics>) -> Self {
        Self {
            model: OnceLock::new(),
            queue,
            metrics,
            concurrency: Arc::new(Semaphore::new(args.max_concurrent)),
            max_concurrent: args.max_concurrent,
            api_key: args.api_key.clone(),
            timeout: args.timeout(),
            max_body_bytes: args.max_body_bytes,
            shutting_down: AtomicBool::new(false),
            openapi: ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| {
                serde_json::json!({ "error": format!("cannot render the OpenAPI document: {e}") }).to_string()
            }),
        }
    }

    /// Publishes the loaded (and warmed-up) model: from now on the server is ready.
    pub fn set_ready(&self, info: ModelInfo) {
        let _ = self.model.set(Arc::new(info));
        self.metrics.set_ready(true);
    }

    /// Marks the server as shutting down (`/ready` answers 503 from now on).
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    fn ready_model(&self) -> Result<Arc<ModelInfo>, ApiError> {
        self.model.get().cloned().ok_or_else(|| {
            ApiError::Unavailable(
                "the model is still loading; retry shortly (see GET /ready)".into(),
            )
        })
    }

    fn in_flight(&self) -> usize {
        self.max_concurrent
            .saturating_sub(self.concurrency.available_permits())
    }

    /// Tokenizes `queries` off the async runtime, queues them and awaits the worker's answer.
    async fn infer(
        &self,
        info: Arc<ModelInfo>,
        queries: Vec<String>,
        params: GenParams,
        field: fn(usize) -> String,
        started: Instant,
    ) -> Result<(Vec<String>, JobResult), ApiError> {
        let deadline = started + self.timeout;
        let (queries, inputs) = tokio::task::spawn_blocking(move || {
            let inputs = info.encode(&queries, field);
            (queries, inputs)
        })
        .await
        .map_err(|e| ApiError::Internal(format!("tokenization failed: {e}")))?;
        let inputs = inputs?;
        let (reply, answer) = oneshot::channel();
        let job = Job {
            inputs,
            params,
            enqueued: Instant::now(),
            deadline,
            reply,
        };
        self.queue.submit(job).map_err(|e| match e {
            SubmitError::Full => ApiError::Overloaded(format!(
                "the queue is full ({} requests waiting, --max_queue); retry later",
                self.queue.capacity()
            )),
            SubmitError::Closed => ApiError::Unavailable("the inference worker has stopped".into()),
        })?;
        let timeout_ms = self.timeout.as_millis() as u64;
        match tokio::time::timeout_at(deadline.into(), answer).await {
            Err(_) | Ok(Ok(Err(JobError::Timeout))) => Err(ApiError::Timeout(timeout_ms)),
            Ok(Err(_)) => Err(ApiError::Internal(
                "the inference worker dropped the request".into(),
            )),
            Ok(Ok(Err(JobError::Failed(m)))) => {
                Err(ApiError::Internal(format!("generation failed: {m}")))
            }
            Ok(Ok(Ok(result))) => Ok((queries, result)),
        }
    }
}

/// A JSON request body, parsed whatever the `Content-Type` (the original client sent JSON as
/// plain text). Every failure becomes a JSON error: 413 over the body limit, 400 otherwise.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<SharedState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &SharedState) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(state.max_body_bytes)
            } else {
                ApiError::BadRequest(format!("cannot read the request body: {}", e.body_text()))
            }
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::BadRequest(
                "the request body is empty; expected a JSON object".into(),
            ));
        }
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
        if !value.is_object() {
            return Err(ApiError::BadRequest(format!(
                "invalid type: the body is a JSON {}, expected a JSON object",
                json_kind(&value)
            )));
        }
        serde_path_to_error::deserialize(value)
            .map(JsonBody)
            .map_err(|e| {
                let path = e.path().to_string();
                if path == "." {
                    ApiError::BadRequest(format!("invalid request: {}", e.inner()))
                } else {
                    ApiError::BadRequest(format!("invalid field `{path}`: {}", e.inner()))
                }
            })
    }
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
    JsonBody(req): JsonBody<SeedRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let info = st.ready_model()?;
    let params = info.defaults;
    let (mut queries, job) = st
        .infer(
            info,
            vec![req.prompt],
            params,
            |_| "`prompt`".into(),
            started,
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
    JsonBody(req): JsonBody<KeywordsRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
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
    let params = info.params(req.num_beams, req.max_length)?;
    let model = info.name.clone();
    let (queries, job) = st.infer(info, queries, params, field, started).await?;
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
    if st.shutting_down.load(Ordering::Acquire) {
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
        st.metrics.render(st.in_flight()),
    )
        .into_response()
}

/// This API's OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3 document", body = Object)))]
pub async fn openapi_json(State(st): State<SharedState>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        st.openapi.clone(),
    )
        .into_response()
}

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no route for {method} {}", uri.path()))
}

/// Keyword-route guard: checks the API key (in constant time) and the concurrency limit.
async fn guard(State(st): State<SharedState>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        if !bearer_matches(req.headers(), key) {
            return ApiError::Unauthorized.into_response();
        }
    }
    let Ok(_permit) = st.concurrency.clone().try_acquire_owned() else {
        return ApiError::Overloaded(format!(
            "too many concurrent requests (limit {}, --max_concurrent); retry later",
            st.max_concurrent
        ))
        .into_response();
    };
    next.run(req).await
}

/// Whether `Authorization: Bearer <token>` carries `key`; the token is compared in constant time.
fn bearer_matches(headers: &HeaderMap, key: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && bool::from(token.trim().as_bytes().ct_eq(key.as_bytes()))
}

/// Turns error responses that are not JSON (axum's 405, the body limit's 413, …) into
/// `{"error": "…"}` with the same status and headers.
async fn json_errors(State(st): State<SharedState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let error = match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(st.max_body_bytes).to_string(),
        StatusCode::NOT_FOUND => format!("no route for {method} {path}"),
        // axum adds the `Allow` header outside this middleware; it is kept on the response.
        StatusCode::METHOD_NOT_ALLOWED => format!("method {method} is not allowed on {path}"),
        _ if !text.is_empty() => text,
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let body = serde_json::to_vec(&ErrorBody { error }).unwrap_or_default();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body))
}

/// Records request metrics and writes one access-log line per request.
async fn observe(State(st): State<SharedState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    let latency = started.elapsed();
    let status = resp.status().as_u16();
    st.metrics.record_request(&route, status, latency);
    let batch_size = resp.extensions().get::<BatchSize>().map(|b| b.0 as u64);
    tracing::info!(
        target: "kb_serve::access",
        method = %method,
        route = %route,
        status,
        latency_ms = latency.as_secs_f64() * 1000.0,
        batch_size,
        "request"
    );
    resp
}

/// Declares the optional bearer-token scheme.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "Required on keyword routes only when the server runs with --api_key",
                    ))
                    .build(),
            ),
        );
    }
}

/// The OpenAPI document of kb-serve.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "kb-serve",
        description = "KoBART keyword extraction over HTTP, with dynamic batching. Errors are JSON `{\"error\": \"…\"}`."
    ),
    paths(keyword_extract, keywords, health, ready, metrics, openapi_json),
    components(schemas(SeedRequest, SeedResponse, KeywordsRequest, KeywordsResponse, KeywordResult, StatusBody, ErrorBody)),
    modifiers(&BearerAuth),
    tags(
        (name = "keywords", description = "Keyword extraction"),
        (name = "operations", description = "Health, readiness, metrics and this document")
    )
)]
pub struct ApiDoc;

/// Builds the application: routes, limits, middleware and (if asked) CORS.
pub fn build(state: SharedState, args: &Args) -> Router {
    let keyword_routes = Router::new()
        .route("/keyword_extract", post(keyword_extract))
        .route("/v1/keywords", post(keywords))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard));
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .merge(keyword_routes)
        .fallback(not_found)
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(args.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), observe));
    if !args.cors_origin.is_empty() {
        let origins = if args.cors_origin.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(
                args.cors_origin
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            )
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION])
                .expose_headers([
                    header::RETRY_AFTER,
                    header::HeaderName::from_static("x-batch-size"),
                ]),
        );
    }
    app.with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_checked() {
        let mut h = HeaderMap::new();
        assert!(!bearer_matches(&h, "k3y"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer k3y"),
        );
        assert!(bearer_matches(&h, "k3y"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer k3y"),
        );
        assert!(bearer_matches(&h, "k3y"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k3"));
        assert!(!bearer_matches(&h, "k3y"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic k3y"));
        assert!(!bearer_matches(&h, "k3y"));
    }

    #[test]
    fn openapi_documents_every_route() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        for path in [
            "/keyword_extract",
            "/v1/keywords",
            "/health",
            "/ready",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(doc["paths"].get(path).is_some(), "{path} missing");
        }
        assert!(doc["components"]["schemas"]
            .get("KeywordsRequest")
            .is_some());
        assert!(doc["components"]["securitySchemes"].get("bearer").is_some());
    }
}
