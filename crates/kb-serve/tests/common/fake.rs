//! kb-serve in the test process on a fake backend (through the `Generate` seam), for tests where
//! the model is not the point: overload, hostile connections, request decoding.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser as _;
use kb_core::{BartConfig, GenerationConfig, KoTokenizer};
use kb_serve::backend::{BackendOptions, GenParams, Generate, ModelInfo, Output};
use tokio::sync::oneshot;

use super::{client, metric_value, MODEL};

/// What the fake backend did.
#[derive(Debug, Default)]
pub struct FakeStats {
    /// Whether a batch is being generated now.
    pub busy: AtomicBool,
    /// Rows of the batch being generated now.
    pub rows_now: AtomicUsize,
    /// Batches generated.
    pub batches: AtomicUsize,
    /// Decoding steps run (each sleeps the fake's step).
    pub steps: AtomicUsize,
    /// Rows given up because their client went away.
    pub abandoned_rows: AtomicUsize,
    /// Rows answered.
    pub answered_rows: AtomicUsize,
}

impl FakeStats {
    /// Whether the worker is idle (no batch being generated).
    pub fn idle(&self) -> bool {
        !self.busy.load(Ordering::Acquire)
    }
}

/// A backend that "decodes" `max_length - 1` steps of `step` each, checking between steps
/// whether each row is still wanted, like the real one; answers `fake, N` where N is the
/// row's token count.
pub struct Fake {
    /// Time of one decoding step.
    pub step: Duration,
    /// Shared counters.
    pub stats: Arc<FakeStats>,
}

impl Generate for Fake {
    fn generate(
        &self,
        inputs: &[Vec<u32>],
        params: GenParams,
        ready: &mut dyn FnMut(usize, Output),
        wanted: &dyn Fn(usize) -> bool,
    ) -> Result<(), String> {
        let s = &self.stats;
        s.busy.store(true, Ordering::Release);
        s.rows_now.store(inputs.len(), Ordering::Release);
        s.batches.fetch_add(1, Ordering::Relaxed);
        let mut live = vec![true; inputs.len()];
        for _ in 1..params.max_length {
            for (i, l) in live.iter_mut().enumerate() {
                if *l && !wanted(i) {
                    *l = false;
                    s.abandoned_rows.fetch_add(1, Ordering::Relaxed);
                }
            }
            if !live.contains(&true) {
                break;
            }
            if !self.step.is_zero() {
                std::thread::sleep(self.step);
            }
            s.steps.fetch_add(1, Ordering::Relaxed);
        }
        for (i, row) in inputs.iter().enumerate() {
            if live[i] {
                let keywords = vec!["fake".to_string(), row.len().to_string()];
                ready(
                    i,
                    Output {
                        text: keywords.join(", "),
                        keywords,
                        tokens: params.max_length - 1,
                    },
                );
                s.answered_rows.fetch_add(1, Ordering::Relaxed);
            }
        }
        s.rows_now.store(0, Ordering::Release);
        s.busy.store(false, Ordering::Release);
        Ok(())
    }
}

/// The fixture model's tokenizer and limits under `options` (the fake needs no weights).
pub fn fixture_info(options: &BackendOptions) -> ModelInfo {
    let dir = Path::new(MODEL);
    let config = BartConfig::from_file(&dir.join("config.json")).expect("fixture config");
    let generation = GenerationConfig::from_model_dir(dir, &config).expect("fixture generation");
    let tokenizer = KoTokenizer::from_model_dir(dir, &config).expect("fixture tokenizer");
    ModelInfo::new(
        &options.model,
        tokenizer,
        &generation,
        config.max_position_embeddings,
        options,
    )
    .expect("fixture limits")
}

/// The serve options of `kb-serve --model MODEL ARGS…`.
pub fn options(args: &[&str]) -> kb_serve::ServeOptions {
    let base = ["kb-serve", "--model", MODEL];
    kb_serve::Args::try_parse_from(base.iter().chain(args))
        .expect("kb-serve options")
        .options()
        .expect("valid options")
}

/// kb-serve on the fake backend, in this process; stopped when dropped.
pub struct FakeServer {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// `127.0.0.1:PORT`.
    pub addr: std::net::SocketAddr,
    /// What the fake backend did.
    pub stats: Arc<FakeStats>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl FakeServer {
    /// Starts kb-serve with `args` on a fake backend whose decoding steps take `step`, and waits
    /// until it is ready.
    pub async fn start(step: Duration, args: &[&str]) -> FakeServer {
        let options = options(args);
        let info = fixture_info(&options.backend);
        // Bound as the binary binds (kb_cli::server::listen): with its listen backlog.
        let listener = kb_cli::server::bind("127.0.0.1", 0).await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let stats = Arc::new(FakeStats::default());
        let fake = Fake {
            step,
            stats: stats.clone(),
        };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(kb_serve::serve_with(
            listener,
            options,
            move || Ok((fake, info)),
            async move {
                let _ = rx.await;
            },
        ));
        let server = FakeServer {
            base: format!("http://{addr}"),
            addr,
            stats,
            shutdown: Some(tx),
            task: Some(task),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client().get(server.url("/ready")).send().await {
                if r.status() == 200 {
                    return server;
                }
            }
            assert!(Instant::now() < deadline, "kb-serve never became ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Reads one value of `/metrics`.
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

    /// Asks the server to shut down and returns what `serve` returned.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let task = self.task.take().expect("running");
        task.await.expect("the server did not panic")
    }

    /// Signals shutdown without waiting; `join` waits.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the server to end after [`FakeServer::begin_stop`].
    pub async fn join(&mut self) -> anyhow::Result<()> {
        let task = self.task.take().expect("running");
        task.await.expect("the server did not panic")
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The resident set size of this process in bytes (Linux), or 0 when unknown.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Raises this process's open-file limit to at least `n` where the hard limit allows.
pub fn raise_fd_limit(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < n {
            lim.rlim_cur = n.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
