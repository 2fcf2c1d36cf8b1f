//! The demo server without a browser: the embedded page and its assets, the proxy to kb-serve,
//! and JSON errors for bad input and for kb-serve being down or slow.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{dead_server, get, post, Demo, KbServe, ERROR_MESSAGE};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_embedded_page_and_assets() {
    let demo = Demo::start(&dead_server(), &[]);
    let page = get(&demo.url("/")).await;
    assert_eq!(page.status, 200);
    assert!(page.header("content-type").starts_with("text/html"));
    for s in [
        "<title>KoBART Keyword Extract</title>",
        "문장 입력시 keyword를 추출해드립니다.",
        "placeholder=\"문장을 여기 입력해주세요.\"",
        "대화 초기화",
        "<label for=\"prompt\"",
        "class=\"spinner\"",
    ] {
        assert!(page.text.contains(s), "{s:?} missing from the page");
    }
    let csp = page.header("content-security-policy");
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    assert_eq!(page.header("x-content-type-options"), "nosniff");

    let js = get(&demo.url("/static/app.js")).await;
    assert_eq!(js.status, 200);
    assert!(js.header("content-type").starts_with("text/javascript"));
    assert!(js.text.contains(ERROR_MESSAGE));
    assert!(js.text.contains("localStorage"));
    let css = get(&demo.url("/static/style.css")).await;
    assert_eq!(css.status, 200);
    assert!(css.header("content-type").starts_with("text/css"));
    assert!(css.text.contains("Noto Sans KR") && css.text.contains("Malgun Gothic"));
    let icon = get(&demo.url("/favicon.svg")).await;
    assert_eq!(
        (icon.status, icon.header("content-type")),
        (200, "image/svg+xml")
    );

    let missing = get(&demo.url("/nope")).await;
    assert_eq!(missing.status, 404);
    assert!(missing.error().contains("/nope"));
    let health = get(&demo.url("/health")).await;
    assert_eq!(
        (health.status, health.json()["status"].as_str()),
        (200, Some("ok"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_keywords_and_readiness_to_kb_serve() {
    let mut serve = KbServe::start().await;
    let demo = Demo::start(&serve.base, &[]);

    let ready = get(&demo.url("/api/ready")).await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    assert_eq!(ready.json()["ready"], true);
    assert!(ready.json()["model"]
        .as_str()
        .unwrap()
        .contains("tiny-kobart"));

    let query = "이사화물 통관예약을 하면 뭐가 좋나요?";
    let body = serde_json::json!({ "query": format!("  {query}\n") }).to_string();
    let ans = post(&demo.url("/api/keywords"), body).await;
    assert_eq!(ans.status, 200, "{}", ans.text);
    let json = ans.json();
    let result = &json["results"][0];
    assert_eq!(result["query"], query, "the proxy trims the sentence");
    assert!(result["keywords"].is_array());
    assert!(result["text"].is_string());
    assert!(json["elapsed_ms"].as_f64().unwrap() >= 0.0);
    assert!(json["proxy_ms"].as_f64().unwrap() >= 0.0);

    // kb-serve's own errors come back with their status and message.
    let long = "가".repeat(1_500);
    let ans = post(
        &demo.url("/api/keywords"),
        serde_json::json!({ "query": long }).to_string(),
    )
    .await;
    assert_eq!(ans.status, 422, "{}", ans.text);
    assert!(!ans.error().is_empty());

    serve.stop().await;
    let ans = post(&demo.url("/api/keywords"), r#"{"query": "안녕하세요"}"#).await;
    assert_eq!(ans.status, 502, "{}", ans.text);
    assert!(ans.error().contains("kb-serve"), "{}", ans.text);
    let ready = get(&demo.url("/api/ready")).await;
    assert_eq!(ready.status, 502);
    assert_eq!(ready.json()["ready"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_the_api_key_of_kb_serve() {
    let serve = KbServe::start_with(common::MODEL, &["--api_key", "s3cret"]).await;
    let body = r#"{"query": "직구로 캠핑용품 사면 관세 내야 하나요?"}"#;
    let without = Demo::start(&serve.base, &[]);
    let ans = post(&without.url("/api/keywords"), body).await;
    assert_eq!(ans.status, 401, "{}", ans.text);
    assert!(ans.error().contains("API key"));
    let with = Demo::start(&serve.base, &["--api-key", "s3cret"]);
    let ans = post(&with.url("/api/keywords"), body).await;
    assert_eq!(ans.status, 200, "{}", ans.text);
    assert!(ans.json()["results"][0]["keywords"].is_array());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_down_is_a_502_json_error() {
    let dead = dead_server();
    let demo = Demo::start(&dead, &[]);
    let ans = post(&demo.url("/api/keywords"), r#"{"query": "안녕하세요"}"#).await;
    assert_eq!(ans.status, 502);
    assert!(ans.header("content-type").starts_with("application/json"));
    assert!(ans.error().contains(&dead), "{}", ans.text);
    let ready = get(&demo.url("/api/ready")).await;
    assert_eq!(ready.status, 502);
    assert_eq!(ready.json()["ready"], false);
    assert!(demo.logs().contains("unreachable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_a_504_json_error() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((sock, _)) = listener.accept().await {
            open.push(sock);
        }
    });
    let demo = Demo::start(&base, &["--timeout-ms", "300"]);
    let started = std::time::Instant::now();
    let ans = post(&demo.url("/api/keywords"), r#"{"query": "안녕하세요"}"#).await;
    assert_eq!(ans.status, 504, "{}", ans.text);
    assert!(ans.error().contains("300 ms"), "{}", ans.text);
    assert!(started.elapsed() < Duration::from_secs(10));
    hold.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_json_errors() {
    let demo = Demo::start(&dead_server(), &["--max_query_chars", "10"]);
    let url = demo.url("/api/keywords");
    let cases: [(&str, u16, &str); 8] = [
        ("", 400, "invalid JSON"),
        ("not json", 400, "invalid JSON"),
        ("[1, 2]", 400, "JSON object"),
        ("{}", 400, "missing field `query`"),
        (r#"{"query": 3}"#, 400, "must be a string"),
        (r#"{"query": "   "}"#, 422, "is empty"),
        (
            r#"{"query": "가나다라마바사아자차카"}"#,
            422,
            "--max_query_chars",
        ),
        ("{\"query\": \"\u{0}\"", 400, "invalid JSON"),
    ];
    for (body, status, needle) in cases {
        let ans = post(&url, body).await;
        assert_eq!(ans.status, status, "{body:?}: {}", ans.text);
        assert!(ans.error().contains(needle), "{body:?}: {}", ans.text);
    }
    let big = format!(r#"{{"query": "{}"}}"#, "a".repeat(100_000));
    let ans = post(&url, big).await;
    assert_eq!(ans.status, 413, "{}", ans.text);
    assert!(!ans.error().is_empty());
    let ans = get(&url).await;
    assert_eq!(ans.status, 405);
    assert!(!ans.error().is_empty());
    // Still serving after all that.
    assert_eq!(get(&demo.url("/health")).await.status, 200);
}

#[test]
fn help_documents_the_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_kb-demo"))
        .arg("--help")
        .output()
        .expect("kb-demo --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for s in [
        "--server",
        "--host",
        "--port",
        "--timeout_ms",
        "KB_DEMO_SERVER",
        "KB_DEMO_PORT",
        "/api/keywords",
        "listening on",
    ] {
        assert!(help.contains(s), "{s} missing from --help:\n{help}");
    }
}

#[test]
fn a_bad_server_url_is_refused_at_startup() {
    let out = Command::new(env!("CARGO_BIN_EXE_kb-demo"))
        .args(["--server", "localhost:8459", "--port", "0"])
        .output()
        .expect("kb-demo runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--server"));
}
