//! End-to-end tests: the real `kb-serve` binary on the tiny fixture model, over HTTP.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn health_ready_metrics_and_openapi_answer() {
    let server = Server::start(&[]).await;
    let c = client();

    let health = answer(c.get(server.url("/health")).send().await.unwrap()).await;
    assert_eq!(health.status, 200);
    assert_eq!(health.json["status"], "ok");

    let ready = answer(c.get(server.url("/ready")).send().await.unwrap()).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json["status"], "ready");
    assert_eq!(ready.json["model"], MODEL);

    let doc = answer(c.get(server.url("/openapi.json")).send().await.unwrap()).await;
    assert_eq!(doc.status, 200);
    assert!(doc.json["openapi"].as_str().unwrap().starts_with('3'));
    for path in [
        "/keyword_extract",
        "/v1/keywords",
        "/health",
        "/ready",
        "/metrics",
    ] {
        assert!(
            doc.json["paths"].get(path).is_some(),
            "{path} is not documented"
        );
    }
    for schema in [
        "SeedRequest",
        "SeedResponse",
        "KeywordsRequest",
        "KeywordsResponse",
        "ErrorBody",
    ] {
        assert!(
            doc.json["components"]["schemas"].get(schema).is_some(),
            "{schema} missing"
        );
    }

    post_json(&server, "/v1/keywords", &json!({"query": "안녕하세요"})).await;
    let resp = c.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    for series in [
        "kb_requests_total{route=\"/v1/keywords\",status=\"200\"} 1",
        "kb_requests_total{route=\"/ready\",status=\"200\"}",
        "kb_request_duration_seconds_bucket{route=\"/v1/keywords\",le=\"+Inf\"} 1",
        "kb_batch_size_bucket{le=\"1\"}",
        "kb_queue_depth 0",
        "kb_model_ready 1",
        "kb_generated_tokens_total",
        "kb_inference_duration_seconds_count",
    ] {
        assert!(
            text.contains(series),
            "{series} missing from /metrics:\n{text}"
        );
    }
    assert_eq!(metric_value(&text, "kb_batch_size_count"), Some(1.0));

    let missing = answer(c.get(server.url("/nope")).send().await.unwrap()).await;
    assert_eq!(missing.status, 404);
    assert!(missing.error().contains("/nope"));
    let wrong_method = answer(c.get(server.url("/v1/keywords")).send().await.unwrap()).await;
    assert_eq!(wrong_method.status, 405);
    assert!(wrong_method.error().contains("GET"));
}

#[tokio::test]
async fn seed_route_answers_the_original_client_call() {
    let server = Server::start(&[]).await;
    // The original client: requests.post(url, data=json.dumps({"prompt": q})) sends no
    // Content-Type and escapes non-ASCII characters.
    let body = r#"{"prompt": "\uc774\uc0ac\ud654\ubb3c \ud1b5\uad00\uc608\uc57d\uc744 \ud558\uba74 \ubb50\uac00 \uc88b\ub098\uc694?"}"#;
    let seed = post_raw(&server, "/keyword_extract", body).await;
    assert_eq!(seed.status, 200, "{}", String::from_utf8_lossy(&seed.raw));
    assert_eq!(seed.header("content-type"), Some("application/json"));
    assert_eq!(seed.json["prompt"], LONG_QUERY);
    let result = seed.json["result"].as_str().expect("result is a string");
    assert!(!result.is_empty());
    // UTF-8, not \u escapes.
    assert!(String::from_utf8(seed.raw.clone())
        .unwrap()
        .contains(LONG_QUERY));
    assert_eq!(
        seed.json.as_object().unwrap().len(),
        2,
        "exactly prompt and result"
    );

    // Also as text/plain, and the answer matches /v1/keywords' text for the same query.
    let resp = client()
        .post(server.url("/keyword_extract"))
        .header("content-type", "text/plain")
        .body(body)
        .send()
        .await
        .unwrap();
    let again = answer(resp).await;
    assert_eq!(again.json["result"], result);
    let v1 = post_json(&server, "/v1/keywords", &json!({"query": LONG_QUERY})).await;
    assert_eq!(v1.json["results"][0]["text"], result);
}

#[tokio::test]
async fn v1_keywords_answers_single_and_batched_queries_with_settings() {
    let server = Server::start(&[]).await;
    let one = post_json(&server, "/v1/keywords", &json!({"query": LONG_QUERY})).await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json["model"], MODEL);
    assert!(one.json["elapsed_ms"].as_f64().unwrap() > 0.0);
    let results = one.json["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0]["query"], LONG_QUERY);
    let text = results[0]["text"].as_str().unwrap();
    let keywords: Vec<&str> = results[0]["keywords"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let expected: Vec<String> = kb_core::keywords::split_keywords(text);
    assert_eq!(keywords, expected);
    assert_eq!(one.header("x-batch-size"), Some("1"));

    let queries = ["첫 번째 질문", "두 번째 질문입니다", "세 번째"];
    let many = post_json(&server, "/v1/keywords", &json!({"queries": queries})).await;
    assert_eq!(many.status, 200);
    let results = many.json["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    for (r, q) in results.iter().zip(queries) {
        assert_eq!(r["query"], q, "results keep request order");
        assert!(r["keywords"].is_array() && r["text"].is_string());
    }
    assert_eq!(many.header("x-batch-size"), Some("3"));

    // Per-request settings: a short max_length bounds the output.
    let short = post_json(
        &server,
        "/v1/keywords",
        &json!({"query": LONG_QUERY, "num_beams": 1, "max_length": 3}),
    )
    .await;
    assert_eq!(short.status, 200);
    let short_text = short.json["results"][0]["text"].as_str().unwrap();
    assert!(
        short_text.chars().count() < text.chars().count(),
        "{short_text:?} vs {text:?}"
    );
}

#[tokio::test]
async fn malformed_json_and_missing_fields_are_json_400() {
    let server = Server::start(&[]).await;
    let cases: &[(&str, &[u8], &str)] = &[
        ("/keyword_extract", b"{\"prompt\": ", "invalid JSON"),
        ("/keyword_extract", b"not json at all", "invalid JSON"),
        ("/keyword_extract", b"", "empty"),
        ("/keyword_extract", b"{}", "missing field `prompt`"),
        (
            "/keyword_extract",
            b"{\"promt\": \"typo\"}",
            "missing field `prompt`",
        ),
        (
            "/keyword_extract",
            b"{\"prompt\": 5}",
            "invalid field `prompt`: invalid type",
        ),
        (
            "/keyword_extract",
            b"[\"prompt\"]",
            "JSON array, expected a JSON object",
        ),
        (
            "/keyword_extract",
            b"{\"prompt\": \"\xff\xfe\"}",
            "invalid JSON",
        ),
        ("/v1/keywords", b"{}", "missing field `query`"),
        (
            "/v1/keywords",
            b"{\"query\": 3}",
            "invalid field `query`: invalid type",
        ),
        (
            "/v1/keywords",
            b"{\"queries\": \"one\"}",
            "invalid field `queries`",
        ),
        (
            "/v1/keywords",
            b"{\"query\": \"a\", \"num_beams\": -1}",
            "invalid field `num_beams`: invalid value",
        ),
        (
            "/v1/keywords",
            b"{\"query\": \"a\", \"num_beams\": 1e400}",
            "invalid JSON",
        ),
        ("/v1/keywords", b"{\"query\": \"a\"} trailing", "trailing"),
    ];
    for (path, body, needle) in cases {
        let a = post_raw(&server, path, body.to_vec()).await;
        assert_eq!(
            a.status,
            400,
            "{path} {:?}: {}",
            String::from_utf8_lossy(body),
            a.error()
        );
        assert!(
            a.error().contains(needle),
            "{path} {:?}: {:?} lacks {needle:?}",
            String::from_utf8_lossy(body),
            a.error()
        );
    }
}

#[tokio::test]
async fn unprocessable_inputs_are_json_422_naming_the_field() {
    let server = Server::start(&["--max_client_batch_size", "3"]).await;
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "/keyword_extract",
            json!({"prompt": ""}),
            "`prompt` is empty",
        ),
        (
            "/keyword_extract",
            json!({"prompt": " \n\t\u{3000} "}),
            "`prompt` is empty",
        ),
        ("/v1/keywords", json!({"query": ""}), "`query` is empty"),
        (
            "/v1/keywords",
            json!({"queries": ["좋은 질문", "  "]}),
            "`queries[1]` is empty",
        ),
        ("/v1/keywords", json!({"queries": []}), "`queries` is empty"),
        (
            "/v1/keywords",
            json!({"queries": ["a", "b", "c", "d"]}),
            "--max_client_batch_size",
        ),
        (
            "/v1/keywords",
            json!({"query": "a", "queries": ["b"]}),
            "not both",
        ),
        (
            "/v1/keywords",
            json!({"query": "a", "num_beams": 0}),
            "`num_beams`",
        ),
        (
            "/v1/keywords",
            json!({"query": "a", "num_beams": 1000}),
            "--max_num_beams",
        ),
        (
            "/v1/keywords",
            json!({"query": "a", "max_length": 1}),
            "`max_length`",
        ),
        (
            "/v1/keywords",
            json!({"query": "a", "max_length": 100000}),
            "--max_length",
        ),
    ];
    for (path, body, needle) in cases {
        let a = post_json(&server, path, &body).await;
        assert_eq!(a.status, 422, "{path} {body}: {}", a.error());
        assert!(
            a.error().contains(needle),
            "{path} {body}: {:?} lacks {needle:?}",
            a.error()
        );
    }
}

#[tokio::test]
async fn over_long_input_is_422_or_truncated() {
    let long = "이사화물 통관예약을 하면 뭐가 좋나요? ".repeat(10);
    let strict = Server::start(&["--max_input_tokens", "8"]).await;
    let a = post_json(&strict, "/v1/keywords", &json!({"queries": ["짧은", long]})).await;
    assert_eq!(a.status, 422);
    assert!(
        a.error().contains("`queries[1]`") && a.error().contains("--max_input_tokens"),
        "{}",
        a.error()
    );
    let a = post_raw(
        &strict,
        "/keyword_extract",
        json!({"prompt": long}).to_string(),
    )
    .await;
    assert_eq!(a.status, 422);
    assert!(a.error().contains("`prompt` has"), "{}", a.error());

    // Default limit: the model's positions (128 for the fixture).
    let default = Server::start(&[]).await;
    let huge = "통관 ".repeat(300);
    let a = post_json(&default, "/v1/keywords", &json!({"query": huge})).await;
    assert_eq!(a.status, 422, "{}", String::from_utf8_lossy(&a.raw));
    assert!(a.error().contains("limit is 128"), "{}", a.error());

    let lenient = Server::start(&["--max_input_tokens", "8", "--truncate"]).await;
    let a = post_json(&lenient, "/v1/keywords", &json!({"query": long})).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.raw));
}

#[tokio::test]
async fn oversized_body_is_json_413() {
    let server = Server::start(&["--max_body_bytes", "1024"]).await;
    let body = json!({"prompt": "가".repeat(2000)}).to_string();
    let a = post_raw(&server, "/keyword_extract", body).await;
    assert_eq!(a.status, 413);
    assert!(a.error().contains("1024 bytes"), "{}", a.error());
    let a = post_json(
        &server,
        "/v1/keywords",
        &json!({"query": "나".repeat(5000)}),
    )
    .await;
    assert_eq!(a.status, 413);
    // Just under the limit is fine.
    let a = post_json(&server, "/v1/keywords", &json!({"query": "다".repeat(100)})).await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn api_key_guards_keyword_routes_only() {
    let server = Server::start(&["--api_key", "s3cret-key"]).await;
    let c = client();
    let body = json!({"prompt": "안녕하세요"}).to_string();

    let none = answer(
        c.post(server.url("/keyword_extract"))
            .body(body.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(none.status, 401);
    assert!(none.error().contains("Bearer"));
    for wrong in [
        "Bearer nope",
        "Bearer s3cret-ke",
        "Bearer s3cret-key2",
        "Basic s3cret-key",
        "s3cret-key",
    ] {
        let a = answer(
            c.post(server.url("/v1/keywords"))
                .header("authorization", wrong)
                .json(&json!({"query": "a"}))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(a.status, 401, "{wrong}");
    }
    let ok = answer(
        c.post(server.url("/keyword_extract"))
            .header("authorization", "Bearer s3cret-key")
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(ok.status, 200);
    for open in ["/health", "/ready"] {
        assert_eq!(
            c.get(server.url(open)).send().await.unwrap().status(),
            200,
            "{open}"
        );
    }
}

#[tokio::test]
async fn full_queue_answers_503_with_retry_after() {
    let mut args = vec![
        "--max_queue",
        "1",
        "--max_batch_size",
        "1",
        "--max_wait_ms",
        "0",
    ];
    args.extend_from_slice(SLOW_OPTS);
    let server = Server::start(&args).await;
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let url = server.url("/v1/keywords");
            tokio::spawn(async move {
                answer(
                    client()
                        .post(url)
                        .json(&slow_body(32))
                        .send()
                        .await
                        .unwrap(),
                )
                .await
            })
        })
        .collect();
    let mut ok = 0;
    let mut full = 0;
    for t in tasks {
        let a = t.await.unwrap();
        match a.status {
            200 => ok += 1,
            503 => {
                full += 1;
                assert_eq!(a.header("retry-after"), Some("1"));
                assert!(a.error().contains("--max_queue"), "{}", a.error());
            }
            s => panic!("unexpected {s}: {}", a.error()),
        }
    }
    assert!(ok >= 1 && full >= 1, "{ok} answered, {full} refused");
    assert!(
        server
            .metric("kb_requests_total{route=\"/v1/keywords\",status=\"503\"}")
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn concurrency_limit_answers_503() {
    let mut args = vec!["--max_concurrent", "1"];
    args.extend_from_slice(SLOW_OPTS);
    let server = Server::start(&args).await;
    let url = server.url("/v1/keywords");
    let slow = tokio::spawn(async move {
        answer(
            client()
                .post(url)
                .json(&slow_body(32))
                .send()
                .await
                .unwrap(),
        )
        .await
    });
    // Wait until the slow request holds the only slot.
    for _ in 0..200 {
        if server.metric("kb_keyword_requests_in_flight").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = post_json(&server, "/v1/keywords", &json!({"query": "안녕"})).await;
    assert_eq!(refused.status, 503);
    assert!(refused.error().contains("--max_concurrent"));
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(slow.await.unwrap().status, 200);
}

#[tokio::test]
async fn slow_request_times_out_with_json_504() {
    let mut args = vec!["--timeout_ms", "50"];
    args.extend_from_slice(SLOW_OPTS);
    let server = Server::start(&args).await;
    let a = post_json(&server, "/v1/keywords", &slow_body(32)).await;
    assert_eq!(a.status, 504);
    assert!(a.error().contains("--timeout_ms"), "{}", a.error());
    // The server stays healthy. Generation cannot be interrupted, so wait for the abandoned
    // one to finish; then quick requests are answered within the limit.
    let c = client();
    assert_eq!(
        c.get(server.url("/health")).send().await.unwrap().status(),
        200
    );
    for _ in 0..500 {
        if server.metric("kb_batch_size_count").await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let quick = post_json(
        &server,
        "/v1/keywords",
        &json!({"query": "안녕하세요", "num_beams": 1}),
    )
    .await;
    assert_eq!(quick.status, 200, "{}", String::from_utf8_lossy(&quick.raw));
}

#[tokio::test]
async fn concurrent_requests_land_in_one_batch() {
    let server = Server::start(&["--max_wait_ms", "300", "--max_batch_size", "8"]).await;
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            let url = server.url("/v1/keywords");
            tokio::spawn(async move {
                let body = json!({"query": format!("{i}번 질문: 통관 예약")});
                answer(client().post(url).json(&body).send().await.unwrap()).await
            })
        })
        .collect();
    let mut largest = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        let a = t.await.unwrap();
        assert_eq!(a.status, 200);
        assert_eq!(
            a.json["results"][0]["query"],
            format!("{i}번 질문: 통관 예약"),
            "answers reach the right client"
        );
        largest = largest.max(a.header("x-batch-size").unwrap().parse::<usize>().unwrap());
    }
    assert!(largest > 1, "no batch had more than one request");
    // The batch size histogram agrees: some batch was larger than 1.
    let count = server.metric("kb_batch_size_count").await;
    let singles = server.metric("kb_batch_size_bucket{le=\"1\"}").await;
    assert!(count - singles >= 1.0, "count {count}, singles {singles}");
    assert!(count < 8.0, "8 requests ran in {count} batches");
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_and_exits_0() {
    let mut server = Server::start(SLOW_OPTS).await;
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let url = server.url("/v1/keywords");
            tokio::spawn(async move { client().post(url).json(&slow_body(24)).send().await })
        })
        .collect();
    let mut in_flight = 0.0;
    for _ in 0..400 {
        in_flight = server.metric("kb_keyword_requests_in_flight").await;
        if in_flight >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(in_flight, 3.0, "requests were not in flight");
    server.signal(libc::SIGTERM);
    for t in tasks {
        let resp = t.await.unwrap().expect("in-flight request completes");
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["results"][0]["query"], LONG_QUERY);
    }
    let status = server.wait_exit(Duration::from_secs(20));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        server.logs()
    );
    let logs = server.logs();
    assert!(
        logs.contains("SIGTERM") && logs.contains("stopped"),
        "{logs}"
    );
    // No longer accepting connections.
    assert!(client().get(server.url("/health")).send().await.is_err());
}

#[tokio::test]
async fn sigint_on_an_idle_server_exits_0() {
    let mut server = Server::start(&[]).await;
    server.signal(libc::SIGINT);
    assert!(server.wait_exit(Duration::from_secs(10)).success());
}

#[tokio::test]
async fn options_come_from_environment_and_kebab_case_spellings() {
    let server = Server::start_env(
        &["--max-client-batch-size", "2"],
        &[
            ("KB_MAX_INPUT_TOKENS", "4"),
            ("KB_API_KEY", "env-key"),
            ("KB_LOG_FORMAT", "json"),
            ("KB_QUANTIZE", "int8"),
            ("KB_KV_CACHE_DTYPE", "f16"),
        ],
    )
    .await;
    let logs = server.logs();
    assert!(
        logs.contains(r#""quantization":"int8""#) && logs.contains(r#""kv_cache_dtype":"F16""#),
        "KB_QUANTIZE and KB_KV_CACHE_DTYPE apply: {logs}"
    );
    let c = client();
    let post = |body: Value| {
        c.post(server.url("/v1/keywords"))
            .header("authorization", "Bearer env-key")
            .json(&body)
            .send()
    };
    let a = answer(post(json!({"query": LONG_QUERY})).await.unwrap()).await;
    assert_eq!(a.status, 422, "KB_MAX_INPUT_TOKENS applies");
    let a = answer(post(json!({"queries": ["a", "b", "c"]})).await.unwrap()).await;
    assert_eq!(a.status, 422, "--max-client-batch-size applies");
    assert!(a.error().contains("limit is 2"));
    let a = answer(post(json!({"query": "안녕"})).await.unwrap()).await;
    assert_eq!(a.status, 200);

    let help = std::process::Command::new(env!("CARGO_BIN_EXE_kb-serve"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for needle in [
        "--max_batch_size",
        "KB_MAX_BATCH_SIZE",
        "--max_wait_ms",
        "KB_PORT",
        "[default: 8459]",
        "127.0.0.1",
        "--cors_origin",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

#[tokio::test]
async fn access_log_is_one_json_line_per_request() {
    let server = Server::start(&["--log_format", "json"]).await;
    let a = post_json(&server, "/v1/keywords", &json!({"query": "안녕하세요"})).await;
    assert_eq!(a.status, 200);
    post_json(&server, "/v1/keywords", &json!({"query": ""})).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let logs = server.logs();
    let lines: Vec<Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let access: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "kb_serve::access" && l["route"] == "/v1/keywords")
        .collect();
    assert_eq!(access.len(), 2, "{logs}");
    assert_eq!(access[0]["status"], 200);
    assert_eq!(access[0]["batch_size"], 1);
    assert!(access[0]["latency_ms"].as_f64().unwrap() > 0.0);
    assert_eq!(access[1]["status"], 422);
}

#[tokio::test]
async fn cors_preflight_is_answered_when_configured() {
    let server = Server::start(&["--cors_origin", "https://chat.example"]).await;
    let resp = client()
        .request(reqwest::Method::OPTIONS, server.url("/v1/keywords"))
        .header("origin", "https://chat.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://chat.example"
    );
    let plain = Server::start(&[]).await;
    let resp = client()
        .post(plain.url("/v1/keywords"))
        .header("origin", "https://chat.example")
        .json(&json!({"query": "안녕"}))
        .send()
        .await
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn hostile_inputs_never_get_500_and_never_stop_the_server() {
    let mut server = Server::start(&[]).await;
    let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("/keyword_extract", nested.clone().into_bytes()),
        (
            "/v1/keywords",
            format!("{{\"query\": {nested}}}").into_bytes(),
        ),
        (
            "/keyword_extract",
            br#"{"prompt": "\u0000\u0001\u001f"}"#.to_vec(),
        ),
        ("/keyword_extract", br#"{"prompt": "\ud800"}"#.to_vec()),
        (
            "/keyword_extract",
            json!({"prompt": "<s></s><pad><unk><usr>"})
                .to_string()
                .into_bytes(),
        ),
        (
            "/keyword_extract",
            json!({"prompt": "😀🇰🇷 ᄀᆞᆫ \u{200b}\u{202e}abc"})
                .to_string()
                .into_bytes(),
        ),
        (
            "/keyword_extract",
            json!({"prompt": "a", "prompt2": {"x": [1, 2]}})
                .to_string()
                .into_bytes(),
        ),
        (
            "/keyword_extract",
            br#"{"prompt": "a", "prompt": "b"}"#.to_vec(),
        ),
        (
            "/v1/keywords",
            json!({"queries": vec!["가"; 10_000]})
                .to_string()
                .into_bytes(),
        ),
        (
            "/v1/keywords",
            json!({"query": "a", "num_beams": u64::MAX})
                .to_string()
                .into_bytes(),
        ),
        (
            "/v1/keywords",
            br#"{"query": "a", "max_length": 18446744073709551616}"#.to_vec(),
        ),
        (
            "/v1/keywords",
            json!({"query": "\u{feff}"}).to_string().into_bytes(),
        ),
        (
            "/v1/keywords",
            json!({"query": "가".repeat(100_000)})
                .to_string()
                .into_bytes(),
        ),
        ("/v1/keywords", b"\x00\x01\x02".to_vec()),
        ("/v1/keywords", b"null".to_vec()),
    ];
    for (path, body) in bodies {
        let shown = String::from_utf8_lossy(&body[..body.len().min(60)]).to_string();
        let a = post_raw(&server, path, body).await;
        assert!(
            a.status < 500,
            "{path} {shown}: {} {}",
            a.status,
            String::from_utf8_lossy(&a.raw)
        );
        if a.status != 200 {
            assert!(!a.error().is_empty());
        }
    }
    assert!(server.is_running());
    assert_eq!(
        client()
            .get(server.url("/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let a = post_json(&server, "/v1/keywords", &json!({"query": "안녕하세요"})).await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn an_unloadable_model_exits_with_an_error_naming_it() {
    let mut server = Server::spawn(
        &["--model", "/definitely/not/a/model", "--port", "0"],
        &[],
        &[],
    );
    let status = server.wait_exit(Duration::from_secs(20));
    assert!(!status.success());
    assert!(
        server.logs().contains("/definitely/not/a/model"),
        "{}",
        server.logs()
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kb-serve"))
        .args([
            "--model",
            MODEL,
            "--port",
            "0",
            "--max_input_tokens",
            "5000",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--max_input_tokens 5000") && err.contains("max_position_embeddings"),
        "{err}"
    );
}

#[tokio::test]
async fn synonyms_map_answers_to_canonical_terms() {
    // What the random fixture model answers without synonyms...
    let plain = Server::start(&[]).await;
    let v1 = post_json(&plain, "/v1/keywords", &json!({"query": LONG_QUERY})).await;
    assert_eq!(v1.status, 200);
    let first = v1.json["results"][0]["keywords"][0]
        .as_str()
        .expect("the fixture model answers at least one keyword")
        .to_string();
    drop(plain);
    // ...becomes a variant of a canonical term, set through KB_SYNONYMS.
    let dir = tempfile::tempdir().unwrap();
    let syn = dir.path().join("syn.tsv");
    std::fs::write(&syn, format!("# test\n정규형\t{first}\n")).unwrap();
    let server = Server::start_env(&[], &[("KB_SYNONYMS", syn.to_str().unwrap())]).await;
    let v1 = post_json(&server, "/v1/keywords", &json!({"query": LONG_QUERY})).await;
    assert_eq!(v1.status, 200);
    let r = &v1.json["results"][0];
    assert_eq!(r["keywords"][0], "정규형");
    let keywords: Vec<String> = r["keywords"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(r["text"], kb_core::keywords::join_keywords(&keywords));
    let seed = post_json(&server, "/keyword_extract", &json!({"prompt": LONG_QUERY})).await;
    assert_eq!(seed.json["result"], r["text"]);
}

#[tokio::test]
async fn grounded_requests_keep_keywords_in_the_query_or_the_derived_terms() {
    let terms =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/derived_terms.tsv");
    let derived = kb_core::generation::DerivedTerms::read(&terms).unwrap();
    // Without derived terms a grounded request is refused, naming the field.
    let plain = Server::start(&[]).await;
    let refused = post_json(
        &plain,
        "/v1/keywords",
        &json!({"query": "이사화물 통관예약을 하면 뭐가 좋나요?", "grounded": true}),
    )
    .await;
    assert_eq!(refused.status, 422);
    assert!(
        refused.error().contains("`grounded`"),
        "{}",
        refused.error()
    );

    // With them, per request and by default (--grounded), every keyword is grounded.
    let server = Server::start(&["--derived_terms", terms.to_str().unwrap(), "--grounded"]).await;
    let queries = [
        "이사화물 통관예약을 하면 뭐가 좋나요?",
        "해외직구 면세한도는 얼마인가요?",
        "amazon에서 $150 신발 샀는데 관세 붙어요?",
    ];
    for body in [
        json!({"queries": queries, "grounded": true, "num_beams": 3}),
        json!({"queries": queries}),
    ] {
        let a = post_json(&server, "/v1/keywords", &body).await;
        assert_eq!(a.status, 200, "{:?}", a.json);
        for (q, r) in queries.iter().zip(a.json["results"].as_array().unwrap()) {
            for k in r["keywords"].as_array().unwrap() {
                let k = k.as_str().unwrap();
                assert!(
                    kb_core::generation::grounding::is_grounded(k, q, &derived),
                    "`{k}` is not grounded in {q}"
                );
            }
        }
    }
    let seed = post_json(&server, "/keyword_extract", &json!({"prompt": queries[0]})).await;
    assert_eq!(seed.status, 200);
}
