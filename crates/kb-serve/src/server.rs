//! Startup and shutdown: load and warm the model on the inference thread, serve connections,
//! and when asked to stop, stop accepting, finish in-flight requests and stop the worker.
//!
//! [`serve`] runs the server on a bound listener until a shutdown future resolves (what tests
//! and other programs embed); [`run`] is the `kb-serve` binary: it binds, prints the
//! `listening on` line and stops on SIGINT/SIGTERM.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::backend::{Backend, BackendError, BackendOptions, Generate, ModelInfo};
use crate::cli::Args;
use crate::http::connections::{serve_connections, ConnectionOptions};
use crate::http::{self, AppState, HttpOptions, SharedState};
use crate::metrics::Metrics;
use crate::queue::{panic_message, run_worker, BatchPolicy, Queue};

/// Everything [`serve`] needs: what [`run`] derives from the command line.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The model and its limits.
    pub backend: BackendOptions,
    /// How the inference worker forms batches.
    pub batch: BatchPolicy,
    /// Keyword requests allowed to wait for the model (503 beyond).
    pub max_queue: usize,
    /// Request limits, authentication and CORS.
    pub http: HttpOptions,
    /// Connection limit and timeouts.
    pub connections: ConnectionOptions,
}

/// Runs the server until SIGINT or SIGTERM (then returns `Ok` once in-flight requests are done),
/// or until the model fails to load (then returns that error).
pub async fn run(args: Args) -> anyhow::Result<()> {
    let options = args.options().map_err(anyhow::Error::msg)?;
    let signals = kb_cli::server::ShutdownSignals::install()?;
    let (listener, addr) = kb_cli::server::listen(&args.host, args.port).await?;
    tracing::info!(%addr, model = %options.backend.model, "listening; loading the model");
    let shutdown = async move {
        let name = signals.recv().await;
        tracing::info!(
            signal = name,
            "shutting down: no new connections, finishing in-flight requests"
        );
    };
    serve(listener, options, shutdown).await
}

/// Serves on `listener` with `options` until `shutdown` resolves (then returns `Ok` once
/// in-flight requests are done), or until the model fails to load (then returns that error).
///
/// The model loads on the inference thread while connections are already accepted: until it is
/// ready, `/ready` and the keyword routes answer 503.
pub async fn serve(
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let backend = options.backend.clone();
    serve_with(listener, options, move || load(&backend), shutdown).await
}

/// Like [`serve`], with the backend made by `load` on the inference thread instead of the model
/// of `options.backend` (tests run a fake [`Generate`] through the whole server this way).
pub async fn serve_with<G, L>(
    listener: TcpListener,
    options: ServeOptions,
    load: L,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()>
where
    G: Generate + 'static,
    L: FnOnce() -> Result<(G, ModelInfo), BackendError> + Send + 'static,
{
    let metrics = Arc::new(Metrics::default());
    let (queue, receiver) = Queue::new(options.max_queue, metrics.clone());
    let state: SharedState = Arc::new(AppState::new(&options.http, queue, metrics.clone()));

    let worker = Worker::spawn(state.clone(), receiver, options.batch, load)?;
    let app = http::router(state.clone(), &options.http);
    let mut load_failed = worker.failed;
    let mut load_error = None;
    let stop = async {
        tokio::select! {
            () = shutdown => {}
            Ok(e) = &mut load_failed => {
                tracing::error!(error = %format!("{e:#}"), "the model could not be loaded; shutting down");
                load_error = Some(e);
            }
        }
        state.set_shutting_down();
    };
    serve_connections(listener, app, &options.connections, metrics, stop).await;

    worker.stop.store(true, Ordering::Release);
    let thread = worker.thread;
    let joined = tokio::task::spawn_blocking(move || thread.join()).await;
    if !matches!(joined, Ok(Ok(()))) {
        tracing::error!("the inference worker ended abnormally");
    }
    if let Some(e) = load_error {
        return Err(e.into());
    }
    tracing::info!("stopped");
    Ok(())
}

/// Loads the model of `options`, works out its limits and warms it up.
fn load(options: &BackendOptions) -> Result<(Backend, ModelInfo), BackendError> {
    let started = Instant::now();
    let backend = Backend::load(options)?;
    let info = backend.info(options)?;
    tracing::info!(
        model = %options.model,
        load_ms = started.elapsed().as_millis() as u64,
        num_beams = info.defaults.num_beams,
        max_length = info.defaults.max_length,
        max_input_tokens = info.max_input_tokens,
        "model loaded; warming up"
    );
    let warm = backend.warm_up(&info)?;
    tracing::info!(warmup_ms = warm.as_millis() as u64, "warm-up done; ready");
    Ok((backend, info))
}

/// The inference thread.
struct Worker {
    thread: std::thread::JoinHandle<()>,
    /// Set to stop the worker once the queue is empty; set on drop too.
    stop: StopOnDrop,
    /// A load failure.
    failed: oneshot::Receiver<BackendError>,
}

/// Sets the flag when dropped, so that a server future dropped midway (aborted by its owner)
/// still stops its worker.
struct StopOnDrop(Arc<AtomicBool>);

impl StopOnDrop {
    fn store(&self, v: bool, order: Ordering) {
        self.0.store(v, order);
    }
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Worker {
    /// Starts the inference thread: it builds the backend with `load`, marks the server ready,
    /// then serves the queue until stopped. A load failure (or panic) is sent on `failed`.
    fn spawn<G, L>(
        state: SharedState,
        receiver: crate::queue::QueueReceiver,
        policy: BatchPolicy,
        load: L,
    ) -> anyhow::Result<Worker>
    where
        G: Generate + 'static,
        L: FnOnce() -> Result<(G, ModelInfo), BackendError> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let (failed_tx, failed) = oneshot::channel();
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("kb-inference".into())
            .spawn(move || {
                let (backend, info) = match catch_unwind(AssertUnwindSafe(load)) {
                    Ok(Ok(loaded)) => loaded,
                    Ok(Err(e)) => {
                        let _ = failed_tx.send(e);
                        return;
                    }
                    Err(payload) => {
                        let _ = failed_tx.send(BackendError::Panicked(panic_message(&payload)));
                        return;
                    }
                };
                drop(failed_tx);
                state.set_ready(info);
                // The worker no longer needs the state; the queue's sender lives in it, and the
                // worker stops when every sender is gone.
                drop(state);
                run_worker(&backend, receiver, policy, &flag);
            })
            .context("cannot start the inference thread")?;
        Ok(Worker {
            thread,
            stop: StopOnDrop(stop),
            failed,
        })
    }
}
