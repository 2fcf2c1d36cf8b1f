//! Startup and shutdown: bind, load and warm the model on the inference thread, serve, and on
//! SIGINT/SIGTERM stop accepting, finish in-flight requests and stop the worker.

use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::backend::Backend;
use crate::cli::Args;
use crate::metrics::Metrics;
use crate::queue::{panic_message, run_worker, BatchPolicy, Queue, QueueReceiver};
use crate::router::{self, AppState, SharedState};

/// Runs the server until SIGINT or SIGTERM (then returns `Ok` once in-flight requests are done),
/// or until the model fails to load (then returns that error).
pub async fn run(args: Args) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    let signals = Signals::install()?;
    let metrics = Arc::new(Metrics::default());
    let (queue, receiver) = Queue::new(args.max_queue, metrics.clone());
    let state: SharedState = Arc::new(AppState::new(&args, queue, metrics));

    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "listening on http://{addr}");
        let _ = out.flush();
    }
    tracing::info!(%addr, model = %args.model, "listening; loading the model");

    let stop_worker = Arc::new(AtomicBool::new(false));
    let (failed_tx, failed_rx) = oneshot::channel::<anyhow::Error>();
    let worker = spawn_worker(
        args.clone(),
        state.clone(),
        receiver,
        stop_worker.clone(),
        failed_tx,
    )?;

    let app = router::build(state.clone(), &args);
    let load_error: Arc<std::sync::Mutex<Option<anyhow::Error>>> = Arc::default();
    let shutdown = {
        let state = state.clone();
        let load_error = load_error.clone();
        async move {
            tokio::select! {
                name = signals.recv() => {
                    tracing::info!(signal = name, "shutting down: no new connections, finishing in-flight requests");
                }
                Ok(e) = failed_rx => {
                    tracing::error!(error = %format!("{e:#}"), "the model could not be loaded; shutting down");
                    *load_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                }
            }
            state.set_shutting_down();
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .context("the HTTP server failed")?;

    stop_worker.store(true, Ordering::Release);
    let joined = tokio::task::spawn_blocking(move || worker.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        tracing::error!("the inference worker ended abnormally");
    }
    if let Some(e) = load_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Starts the inference thread: it loads and warms the model, marks the server ready, then
/// serves the queue until `stop` is set. A load failure is sent on `failed`.
fn spawn_worker(
    args: Args,
    state: SharedState,
    receiver: QueueReceiver,
    stop: Arc<AtomicBool>,
    failed: oneshot::Sender<anyhow::Error>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let policy = BatchPolicy {
        max_batch_size: args.max_batch_size,
        max_wait: args.max_wait(),
    };
    std::thread::Builder::new()
        .name("kb-inference".into())
        .spawn(move || {
            let loaded = catch_unwind(AssertUnwindSafe(|| -> anyhow::Result<_> {
                let started = Instant::now();
                let backend = Backend::load(&args)?;
                let info = backend.info(&args)?;
                tracing::info!(
                    model = %args.model,
                    load_ms = started.elapsed().as_millis() as u64,
                    num_beams = info.defaults.num_beams,
                    max_length = info.defaults.max_length,
                    max_input_tokens = info.max_input_tokens,
                    "model loaded; warming up"
                );
                let warm = backend.warm_up(&info)?;
                tracing::info!(warmup_ms = warm.as_millis() as u64, "warm-up done; ready");
                Ok((backend, info))
            }));
            let (backend, info) = match loaded {
                Ok(Ok(loaded)) => loaded,
                Ok(Err(e)) => {
                    let _ = failed.send(e);
                    return;
                }
                Err(payload) => {
                    let _ = failed.send(anyhow::anyhow!(
                        "loading the model panicked: {}",
                        panic_message(&payload)
                    ));
                    return;
                }
            };
            drop(failed);
            state.set_ready(info);
            run_worker(&backend, receiver, policy, &stop);
        })
        .context("cannot start the inference thread")
}

/// SIGINT and SIGTERM, registered before the server starts so that no signal is missed.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                term: signal(SignalKind::terminate())
                    .context("cannot install the SIGTERM handler")?,
                int: signal(SignalKind::interrupt())
                    .context("cannot install the SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for the first signal and returns its name.
    async fn recv(mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "ctrl-c"
        }
    }
}
