//! The HTTP layer, split as text-embeddings-inference splits its router:
//!
//! - [`types`]: request and response bodies (and their OpenAPI schemas), the JSON body
//!   extractor;
//! - [`handlers`]: the route handlers;
//! - [`middleware`]: the keyword-route guard, JSON error bodies, metrics and the access log;
//! - [`error`]: [`ApiError`], every failure a client can see, with its status;
//! - [`state`]: [`AppState`], what the handlers share, and a request's trip through the queue;
//! - [`connections`]: accepting and serving connections with their limits and timeouts;
//! - this module: the options, the router assembly and the OpenAPI document.

pub mod connections;
pub mod error;
pub mod handlers;
pub mod middleware;
pub mod state;
pub mod types;

use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Method};
use axum::routing::{get, post};
use axum::{middleware as mw, Router};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::limit::RequestBodyLimitLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

pub use connections::ConnectionOptions;
pub use error::ApiError;
pub use state::{AppState, SharedState};

use handlers::*;
use types::*;

/// Limits and settings of the HTTP layer (what the command line sets).
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Keyword requests handled at once (503 beyond).
    pub max_concurrent: usize,
    /// Largest request body in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Time limit of one keyword request, reading its body and queueing included (504 beyond).
    pub timeout: Duration,
    /// Bearer key keyword routes require, if any.
    pub api_key: Option<String>,
    /// Origins allowed by CORS (`*`: any); no CORS headers when empty.
    pub cors_origin: Vec<String>,
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
pub fn router(state: SharedState, options: &HttpOptions) -> Router {
    let keyword_routes = Router::new()
        .route("/keyword_extract", post(keyword_extract))
        .route("/v1/keywords", post(keywords))
        .route_layer(mw::from_fn_with_state(state.clone(), middleware::guard));
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .merge(keyword_routes)
        .fallback(not_found)
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(options.max_body_bytes))
        .layer(mw::from_fn_with_state(
            state.clone(),
            middleware::json_errors,
        ))
        .layer(mw::from_fn_with_state(state.clone(), middleware::observe));
    if !options.cors_origin.is_empty() {
        let origins = if options.cors_origin.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(
                options
                    .cors_origin
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
