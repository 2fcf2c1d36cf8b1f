//! Request decoding never panics: arbitrary bytes, arbitrary JSON values and request-shaped JSON
//! objects posted to both keyword routes (through the router, in-process, on a fake backend)
//! always get a JSON answer: a valid result, or a 4xx/5xx `{"error": "…"}`.
//!
//! 256 cases by default; `PROPTEST_CASES=N` runs N.

mod common;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use common::fake::{fixture_info, options, Fake};
use kb_serve::http::types::{ErrorBody, KeywordsResponse, SeedResponse};
use kb_serve::http::{self, AppState};
use kb_serve::metrics::Metrics;
use kb_serve::queue::{run_worker, Queue};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};
use tower::ServiceExt as _;

/// The router on a ready fake backend, and the runtime that drives it (shared by all cases).
fn app() -> &'static (tokio::runtime::Runtime, Router) {
    static APP: OnceLock<(tokio::runtime::Runtime, Router)> = OnceLock::new();
    APP.get_or_init(|| {
        let options = options(&["--max_wait_ms", "0", "--max_body_bytes", "4096"]);
        let metrics = Arc::new(Metrics::default());
        let (queue, receiver) = Queue::new(options.max_queue, metrics.clone());
        let state = Arc::new(AppState::new(&options.http, queue, metrics));
        state.set_ready(fixture_info(&options.backend));
        let policy = options.batch;
        std::thread::spawn(move || {
            let fake = Fake {
                step: std::time::Duration::ZERO,
                stats: Arc::default(),
            };
            run_worker(&fake, receiver, policy, &AtomicBool::new(false));
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        (runtime, http::router(state, &options.http))
    })
}

/// Posts `body` to `route` and checks the answer; returns the status.
fn check(route: &str, body: Vec<u8>, content_type: Option<&str>) -> Result<u16, TestCaseError> {
    let (runtime, router) = app();
    let mut req = Request::post(route);
    if let Some(ct) = content_type {
        req = req.header(header::CONTENT_TYPE, ct);
    }
    let req = req.body(Body::from(body.clone())).expect("request");
    let (status, content_type, bytes) = runtime.block_on(async {
        let resp = router.clone().oneshot(req).await.expect("infallible");
        let status = resp.status();
        let ct = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("the body arrives whole");
        (status, ct, bytes)
    });
    let shown = || {
        format!(
            "{route} {:?} -> {status} {}",
            String::from_utf8_lossy(&body),
            String::from_utf8_lossy(&bytes)
        )
    };
    prop_assert!(
        status.is_success() || status.is_client_error() || status.is_server_error(),
        "{}",
        shown()
    );
    prop_assert_ne!(status, StatusCode::INTERNAL_SERVER_ERROR, "{}", shown());
    prop_assert!(content_type.starts_with("application/json"), "{}", shown());
    if status == StatusCode::OK {
        let request: Value = serde_json::from_slice(&body).expect("a 200 had a JSON body");
        if route == "/v1/keywords" {
            let r: KeywordsResponse = serde_json::from_slice(&bytes)
                .map_err(|e| TestCaseError::fail(format!("{e}: {}", shown())))?;
            let asked = match (&request["query"], &request["queries"]) {
                (Value::String(_), _) => 1,
                (_, Value::Array(qs)) => qs.len(),
                _ => {
                    return Err(TestCaseError::fail(format!(
                        "200 without a query: {}",
                        shown()
                    )))
                }
            };
            prop_assert_eq!(r.results.len(), asked, "{}", shown());
            for res in &r.results {
                prop_assert!(!res.keywords.is_empty(), "{}", shown());
            }
        } else {
            let r: SeedResponse = serde_json::from_slice(&bytes)
                .map_err(|e| TestCaseError::fail(format!("{e}: {}", shown())))?;
            prop_assert_eq!(Some(r.prompt.as_str()), request["prompt"].as_str());
            prop_assert!(!r.result.is_empty(), "{}", shown());
        }
    } else {
        prop_assert!(!status.is_success(), "{}", shown());
        let e: ErrorBody = serde_json::from_slice(&bytes)
            .map_err(|e| TestCaseError::fail(format!("{e}: {}", shown())))?;
        prop_assert!(!e.error.is_empty(), "{}", shown());
    }
    Ok(status.as_u16())
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        any::<u64>().prop_map(|n| Value::Number(n.into())),
        any::<f64>().prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<String>().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Text a query might hold: Korean, ASCII, whitespace, special tokens, or anything.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(" \t\n\u{3000}".to_string()),
        Just("<s></s><pad><unk>".to_string()),
        "[가-힣 ]{0,24}",
        "[ -~]{0,40}",
        any::<String>(),
    ]
}

/// A value for one of the request's fields: plausible or arbitrary.
fn field_value(key: &'static str) -> BoxedStrategy<Value> {
    let plausible: BoxedStrategy<Value> = match key {
        "queries" => prop::collection::vec(text(), 0..40)
            .prop_map(|qs| Value::Array(qs.into_iter().map(Value::String).collect()))
            .boxed(),
        "num_beams" | "max_length" => prop_oneof![
            (0u64..40).prop_map(|n| Value::Number(n.into())),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            any::<u64>().prop_map(|n| Value::Number(n.into())),
        ]
        .boxed(),
        _ => text().prop_map(Value::String).boxed(),
    };
    prop_oneof![8 => plausible, 1 => json_value()].boxed()
}

/// A JSON object shaped like a request: some of the known fields (and maybe others).
fn request_like() -> impl Strategy<Value = Value> {
    let keys = ["prompt", "query", "queries", "num_beams", "max_length"];
    let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = keys
        .iter()
        .map(|&k| {
            prop::option::weighted(0.6, field_value(k).prop_map(move |v| (k.to_string(), v)))
                .boxed()
        })
        .collect();
    (fields, prop::option::of((any::<String>(), json_value()))).prop_map(|(fields, extra)| {
        let mut obj = Map::new();
        for (k, v) in fields.into_iter().flatten().chain(extra) {
            obj.insert(k, v);
        }
        Value::Object(obj)
    })
}

/// A request body: raw bytes, a JSON value, a request-shaped object, or such an object's text
/// cut short or followed by junk.
fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).expect("serializable")),
        3 => request_like().prop_map(|v| serde_json::to_vec(&v).expect("serializable")),
        1 => (request_like(), any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(v, cut, junk)| {
                let mut b = serde_json::to_vec(&v).expect("serializable");
                b.truncate(cut.index(b.len() + 1));
                b.extend(junk);
                b
            }),
    ]
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

#[test]
fn keyword_routes_answer_any_body_with_json() {
    let config = ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let started = Instant::now();
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, u64>::new());
    let mut runner = proptest::test_runner::TestRunner::new(config.clone());
    let route = prop_oneof![Just("/keyword_extract"), Just("/v1/keywords")];
    let content_type = prop::option::of(prop_oneof![
        Just("application/json"),
        Just("text/plain"),
        Just("application/x-www-form-urlencoded"),
    ]);
    runner
        .run(&(route, body(), content_type), |(route, body, ct)| {
            let status = check(route, body, ct)?;
            *statuses.lock().unwrap().entry(status).or_default() += 1;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let took = started.elapsed();
    let statuses = statuses.into_inner().unwrap();
    eprintln!(
        "{} cases in {:.1} s ({:.0} cases/s); statuses {statuses:?}",
        config.cases,
        took.as_secs_f64(),
        f64::from(config.cases) / took.as_secs_f64()
    );
    // The generators reach past decoding: some bodies are answered, some refused as input.
    if config.cases >= 256 {
        for status in [200, 400, 422] {
            assert!(
                statuses.contains_key(&status),
                "no {status} in {statuses:?}"
            );
        }
    }
}
