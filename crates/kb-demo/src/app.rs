//! The router: the embedded page and its assets, and the proxy routes that forward the page's
//! calls to kb-serve. Every `/api/…` answer is JSON; errors are `{"error": "…"}` with 4xx for
//! bad input and 502 (kb-serve unreachable or garbled), 503 (kb-serve loading or overloaded)
//! or 504 (kb-serve too slow) for upstream trouble.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::cli::Args;

/// The page.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");
/// The page's script.
pub const APP_JS: &str = include_str!("../assets/app.js");
/// The page's style sheet.
pub const STYLE_CSS: &str = include_str!("../assets/style.css");
/// The page's icon.
pub const FAVICON_SVG: &str = include_str!("../assets/favicon.svg");

/// Largest request body the proxy accepts, in bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How long `GET /api/ready` waits for kb-serve.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Content-Security-Policy of every response: only this origin's own script, style and calls.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// State shared by the handlers.
#[derive(Debug)]
pub struct AppState {
    client: reqwest::Client,
    server: String,
    api_key: Option<String>,
    timeout: Duration,
    max_query_chars: usize,
}

impl AppState {
    /// State for a demo started with `args` (which must pass [`Args::validate`]).
    pub fn new(args: &Args) -> anyhow::Result<Arc<Self>> {
        let server = args.server_url().map_err(anyhow::Error::msg)?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| anyhow::anyhow!("cannot build the HTTP client: {e}"))?;
        Ok(Arc::new(Self {
            client,
            server,
            api_key: args.api_key.clone(),
            timeout: args.timeout(),
            max_query_chars: usize::try_from(args.max_query_chars).unwrap_or(usize::MAX),
        }))
    }

    /// The kb-serve base URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let req = self
            .client
            .request(method, format!("{}{path}", self.server));
        match &self.api_key {
            Some(key) => req.bearer_auth(key),
            None => req,
        }
    }
}

/// A JSON error answer.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// Maps a failed call to kb-serve onto 504 (too slow) or 502 (unreachable or broken).
fn upstream_error(st: &AppState, e: &reqwest::Error, limit: Duration) -> Response {
    if e.is_timeout() {
        tracing::warn!(server = %st.server, "kb-serve timed out");
        error(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "kb-serve at {} did not answer within {} ms (--timeout_ms)",
                st.server,
                limit.as_millis()
            ),
        )
    } else {
        tracing::warn!(server = %st.server, error = %e, "kb-serve unreachable");
        let what = if e.is_connect() {
            "cannot connect to"
        } else {
            "the connection failed with"
        };
        error(
            StatusCode::BAD_GATEWAY,
            format!("{what} kb-serve at {}", st.server),
        )
    }
}

/// `POST /api/keywords` `{"query": "…"}`: checks the sentence and forwards it to kb-serve's
/// `POST /v1/keywords`; kb-serve's JSON answer comes back with its status.
pub async fn keywords(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body exceeds {MAX_BODY_BYTES} bytes"),
            )
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {}", e.body_text()),
            )
        }
    };
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid JSON body: {e}")),
    };
    let query = match value.get("query") {
        Some(Value::String(q)) => q.trim(),
        Some(_) => return error(StatusCode::BAD_REQUEST, "field `query` must be a string"),
        None if value.is_object() => {
            return error(StatusCode::BAD_REQUEST, "missing field `query`")
        }
        None => return error(StatusCode::BAD_REQUEST, "expected a JSON object"),
    };
    if query.is_empty() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "field `query` is empty");
    }
    let chars = query.chars().count();
    if chars > st.max_query_chars {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "field `query` has {chars} characters; the limit is {} (--max_query_chars)",
                st.max_query_chars
            ),
        );
    }

    let started = Instant::now();
    let sent = st
        .request(reqwest::Method::POST, "/v1/keywords")
        .timeout(st.timeout)
        .json(&json!({ "query": query }))
        .send()
        .await;
    let resp = match sent {
        Ok(r) => r,
        Err(e) => return upstream_error(&st, &e, st.timeout),
    };
    let status = resp.status();
    let raw = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return upstream_error(&st, &e, st.timeout),
    };
    let Ok(mut answer) = serde_json::from_slice::<Value>(&raw) else {
        return error(
            StatusCode::BAD_GATEWAY,
            format!("kb-serve answered {status} with a body that is not JSON"),
        );
    };
    let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    if status.is_success() {
        let well_formed = answer
            .get("results")
            .and_then(Value::as_array)
            .and_then(|r| r.first())
            .is_some_and(|r| r.get("keywords").is_some_and(Value::is_array));
        if !well_formed {
            return error(
                StatusCode::BAD_GATEWAY,
                "kb-serve answered without keyword results",
            );
        }
        if let Some(obj) = answer.as_object_mut() {
            obj.insert(
                "proxy_ms".into(),
                json!(started.elapsed().as_secs_f64() * 1000.0),
            );
        }
    } else if answer.get("error").and_then(Value::as_str).is_none() {
        return error(status, format!("kb-serve answered {status}"));
    }
    (status, Json(answer)).into_response()
}

/// `GET /api/ready`: whether kb-serve is up and its model warm.
///
/// 200 `{"ready": true, "model": …}`; otherwise `{"ready": false, "error": …}` with 503 while
/// kb-serve loads (or shuts down), 502 when it cannot be reached, 504 when it is too slow.
pub async fn ready(State(st): State<Arc<AppState>>) -> Response {
    let sent = st
        .request(reqwest::Method::GET, "/ready")
        .timeout(READY_TIMEOUT)
        .send()
        .await;
    let (status, body) = match sent {
        Ok(resp) => {
            let status = resp.status();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            (status, body)
        }
        Err(e) => {
            let resp = upstream_error(&st, &e, READY_TIMEOUT);
            let status = resp.status();
            let message = if status == StatusCode::GATEWAY_TIMEOUT {
                format!("kb-serve at {} is not answering", st.server)
            } else {
                format!("cannot connect to kb-serve at {}", st.server)
            };
            return (
                status,
                Json(json!({ "ready": false, "server": st.server, "error": message })),
            )
                .into_response();
        }
    };
    if status.is_success() {
        let model = body.get("model").cloned().unwrap_or(Value::Null);
        return Json(json!({ "ready": true, "server": st.server, "model": model })).into_response();
    }
    let message = body
        .get("error")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| format!("kb-serve answered {status}"));
    let status = if status == StatusCode::SERVICE_UNAVAILABLE {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::BAD_GATEWAY
    };
    (
        status,
        Json(json!({ "ready": false, "server": st.server, "error": message })),
    )
        .into_response()
}

/// `GET /health`: the demo process itself is up (says nothing about kb-serve).
pub async fn health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

async fn favicon() -> Response {
    asset("image/svg+xml", FAVICON_SVG)
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no route for {}", uri.path()),
    )
}

async fn method_not_allowed() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route",
    )
}

/// Adds the security headers (CSP, nosniff, no referrer) to every response.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("DENY"),
    );
    resp
}

/// Builds the application: the page, its assets and the proxy routes.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(index).fallback(method_not_allowed))
        .route("/index.html", get(index))
        .route("/static/app.js", get(app_js))
        .route("/static/style.css", get(style_css))
        .route("/favicon.svg", get(favicon))
        .route("/favicon.ico", get(favicon))
        .route("/api/keywords", post(keywords).fallback(method_not_allowed))
        .route("/api/ready", get(ready).fallback(method_not_allowed))
        .route("/health", get(health))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_carries_the_original_strings() {
        for s in [
            "KoBART Keyword Extract",
            "문장 입력시 keyword를 추출해드립니다.",
            "문장을 여기 입력해주세요.",
            "대화 초기화",
        ] {
            assert!(INDEX_HTML.contains(s), "{s:?} missing from index.html");
        }
        assert!(APP_JS.contains(
            "현재 문제가 발생했습니다. 잠시후 다시 시도해 주세요. 문제가 계속되는 경우 관리자에게 연락바랍니다."
        ));
        assert!(APP_JS.contains("isComposing") && APP_JS.contains("229"));
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for text in [INDEX_HTML, APP_JS, STYLE_CSS] {
            assert!(!text.contains("http://") && !text.contains("https://"));
            assert!(!text.contains("//cdn"));
        }
    }
}
