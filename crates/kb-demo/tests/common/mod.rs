//! Test helpers: kb-serve on the tiny fixture model (in-process, through kb-serve's library),
//! the real `kb-demo` binary, and a few HTTP shortcuts.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser as _;
use serde_json::Value;
use tokio::sync::oneshot;

/// The tiny random KoBART of kb-core's tests.
pub const MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../kb-core/tests/fixtures/tiny-kobart"
);

/// The original page's message for any failure.
pub const ERROR_MESSAGE: &str = "현재 문제가 발생했습니다. 잠시후 다시 시도해 주세요. 문제가 계속되는 경우 관리자에게 연락바랍니다.";

/// kb-serve running inside the test process on the fixture model (through `kb_serve::serve`);
/// stopped by [`KbServe::stop`] or when dropped.
pub struct KbServe {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl KbServe {
    /// Starts kb-serve on the fixture model on a free port and waits until `/ready` answers 200.
    pub async fn start() -> KbServe {
        Self::start_model(MODEL).await
    }

    /// Like [`KbServe::start`] with another model folder.
    pub async fn start_model(model: &str) -> KbServe {
        Self::start_with(model, &[]).await
    }

    /// Like [`KbServe::start`] with another model folder and extra kb-serve options.
    pub async fn start_with(model: &str, extra: &[&str]) -> KbServe {
        let base = ["kb-serve", "--model", model, "--port", "0"];
        let options = kb_serve::Args::try_parse_from(base.iter().chain(extra))
            .expect("kb-serve options")
            .options()
            .expect("valid kb-serve options");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind kb-serve");
        let base = format!("http://{}", listener.local_addr().expect("address"));
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(kb_serve::serve(listener, options, async move {
            let _ = rx.await;
        }));
        let mut server = KbServe {
            base,
            shutdown: Some(tx),
            task: Some(task),
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Ok(r) = client().get(format!("{}/ready", server.base)).send().await {
                if r.status() == 200 {
                    return server;
                }
            }
            if server.task.as_ref().is_some_and(|t| t.is_finished()) {
                let ended = server.task.take().expect("task").await;
                panic!("kb-serve stopped before it was ready: {ended:?}");
            }
            assert!(Instant::now() < deadline, "kb-serve never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops serving (gracefully): the port is closed once this returns.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.task.take() {
            match tokio::time::timeout(Duration::from_secs(10), &mut task).await {
                Ok(ended) => ended
                    .expect("kb-serve did not panic")
                    .expect("kb-serve stopped cleanly"),
                Err(_) => task.abort(),
            }
        }
    }
}

impl Drop for KbServe {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Aborting drops the server: its connections close and its inference worker stops.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// The `kb-demo` binary, killed when dropped.
pub struct Demo {
    child: Child,
    /// `http://127.0.0.1:PORT`, as printed on the `listening on` line.
    pub base: String,
    log: PathBuf,
}

impl Demo {
    /// Starts `kb-demo --server SERVER --port 0 ARGS…` and reads the bound URL.
    pub fn start(server: &str, args: &[&str]) -> Demo {
        let log = std::env::temp_dir().join(format!(
            "kb-demo-test-{}-{}.log",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let mut child = Command::new(env!("CARGO_BIN_EXE_kb-demo"))
            .args(["--server", server, "--port", "0"])
            .args(args)
            .env_remove("KB_DEMO_PORT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("kb-demo starts");
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
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(base) => Demo { child, base, log },
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "kb-demo printed no `listening on` line; its log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
    }

    /// The full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// What kb-demo wrote on stderr so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A URL where nothing listens (a port that was free a moment ago).
pub fn dead_server() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("address");
    drop(l);
    format!("http://{addr}")
}

/// A fresh HTTP client.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// Status, headers and body of a response.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Answer {
    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("status {}: not JSON ({e}): {}", self.status, self.text))
    }

    /// The `error` message of a JSON error body.
    pub fn error(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("not an error body: {}", self.text))
            .to_string()
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn answer(resp: reqwest::Response) -> Answer {
    Answer {
        status: resp.status().as_u16(),
        headers: resp.headers().clone(),
        text: resp.text().await.expect("body"),
    }
}

/// GETs a URL.
pub async fn get(url: &str) -> Answer {
    answer(client().get(url).send().await.expect("request sent")).await
}

/// POSTs raw bytes as JSON.
pub async fn post(url: &str, body: impl Into<reqwest::Body>) -> Answer {
    let resp = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request sent");
    answer(resp).await
}
