//! Starts the real `kb-serve` binary on the tiny fixture model and talks to it over HTTP.

#![allow(dead_code)]

pub mod fake;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The tiny random KoBART of kb-core's tests.
pub const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../kb-core/tests/fixtures/tiny-kobart"
);

/// A query the tiny model answers with a full-length generation (slow with many beams).
pub const LONG_QUERY: &str = "이사화물 통관예약을 하면 뭐가 좋나요?";

/// Options that make a request with [`slow_body`] take a good fraction of a second.
pub const SLOW_OPTS: &[&str] = &["--max_length", "128", "--max_num_beams", "64"];

/// A `/v1/keywords` body that keeps the tiny model busy for a while: 128 tokens with `beams`
/// beams (about a second with 64 beams in a debug build).
pub fn slow_body(beams: usize) -> Value {
    serde_json::json!({ "query": LONG_QUERY, "num_beams": beams })
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A running server, killed when dropped.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    log: PathBuf,
}

impl Server {
    /// Starts `kb-serve --model MODEL --port 0 ARGS…` and waits until `/ready` answers 200.
    pub async fn start(args: &[&str]) -> Server {
        Self::start_env(args, &[]).await
    }

    /// Like [`Server::start`], with extra environment variables.
    pub async fn start_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        let server = Self::spawn(&["--model", MODEL, "--port", "0"], args, env);
        server.wait_ready().await;
        server
    }

    /// Starts the binary with exactly `base` + `args` (no readiness wait).
    pub fn spawn(base: &[&str], args: &[&str], env: &[(&str, &str)]) -> Server {
        let log = std::env::temp_dir().join(format!(
            "kb-serve-test-{}-{}.log",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kb-serve"));
        cmd.args(base)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("kb-serve starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("listening on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.trim().to_string());
                    }
                }
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(base) => base,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "kb-serve printed no `listening on` line; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        };
        Server { child, base, log }
    }

    /// Polls `/ready` until it answers 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client().get(self.url("/ready")).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "kb-serve never became ready; its log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server wrote on stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal to the server.
    pub fn signal(&self, sig: libc::c_int) {
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "kb-serve did not exit; log:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Reads one value of `/metrics` (the first line starting with `series`).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = client()
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("/metrics")
            .text()
            .await
            .expect("metrics text");
        metric_value(&text, series).unwrap_or_else(|| panic!("{series} not in /metrics:\n{text}"))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A fresh HTTP client (no proxy, no connection reuse surprises between tests).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// The value of the first line of a Prometheus text that starts with `series `.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// Status, headers and JSON body of a response.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub raw: Vec<u8>,
    pub json: Value,
}

impl Answer {
    /// The `error` message of an error body.
    pub fn error(&self) -> &str {
        self.json["error"].as_str().unwrap_or_else(|| {
            panic!(
                "not a JSON error body: {}",
                String::from_utf8_lossy(&self.raw)
            )
        })
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Reads a response whose body must be JSON.
pub async fn answer(resp: reqwest::Response) -> Answer {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let raw = resp.bytes().await.expect("body").to_vec();
    let json = serde_json::from_slice(&raw).unwrap_or_else(|e| {
        panic!(
            "status {status}: body is not JSON ({e}): {}",
            String::from_utf8_lossy(&raw)
        )
    });
    Answer {
        status,
        headers,
        raw,
        json,
    }
}

/// POSTs raw bytes (no Content-Type, like `requests.post(url, data=json.dumps(...))`).
pub async fn post_raw(server: &Server, path: &str, body: impl Into<reqwest::Body>) -> Answer {
    let resp = client()
        .post(server.url(path))
        .body(body)
        .send()
        .await
        .expect("request sent");
    answer(resp).await
}

/// POSTs a JSON value with `Content-Type: application/json`.
pub async fn post_json(server: &Server, path: &str, body: &Value) -> Answer {
    let resp = client()
        .post(server.url(path))
        .json(body)
        .send()
        .await
        .expect("request sent");
    answer(resp).await
}
