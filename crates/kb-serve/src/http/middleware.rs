//! Middleware: the keyword-route guard (API key, concurrency limit), JSON error bodies for
//! errors produced outside the handlers, and the observation of every request (metrics and the
//! access log).

use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::state::SharedState;
use super::types::{Admitted, BatchSize, ErrorBody};

/// Keyword-route guard: checks the API key (in constant time) and the concurrency limit, and
/// stamps the request with its admission time (its `--timeout_ms` counts from there).
pub async fn guard(State(st): State<SharedState>, mut req: Request, next: Next) -> Response {
    if let Some(key) = st.api_key() {
        if !bearer_matches(req.headers(), key) {
            return ApiError::Unauthorized.into_response();
        }
    }
    let (slots, max_concurrent) = st.concurrency();
    let Ok(_permit) = slots.clone().try_acquire_owned() else {
        return ApiError::Overloaded(format!(
            "too many concurrent requests (limit {max_concurrent}, --max_concurrent); retry later"
        ))
        .into_response();
    };
    req.extensions_mut().insert(Admitted(Instant::now()));
    next.run(req).await
}

/// Whether `Authorization: Bearer <token>` carries `key`; the token is compared in constant time.
pub fn bearer_matches(headers: &HeaderMap, key: &str) -> bool {
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
pub async fn json_errors(State(st): State<SharedState>, req: Request, next: Next) -> Response {
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
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(st.max_body_bytes()).to_string(),
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
pub async fn observe(State(st): State<SharedState>, req: Request, next: Next) -> Response {
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
}
