//! Accepting and serving connections, with hyper directly (not `axum::serve`) so that hostile
//! or overwhelming clients meet limits:
//!
//! - **connection limit**: at most `max_connections` connections are served at once. The
//!   server stops accepting at the limit, so further connections wait in the kernel's listen
//!   backlog (they are not refused; a client sees a slow connect, then is served as soon as a
//!   connection closes; beyond the backlog the kernel drops new connection attempts and clients
//!   retry as TCP does);
//! - **header read timeout**: a connection must deliver a complete request head within
//!   `header_timeout` of opening, and of its previous response for a kept-alive connection;
//!   otherwise it is closed. This cuts slow-header (slowloris) clients and also closes idle
//!   keep-alive connections after the same time;
//! - **graceful shutdown**: when `shutdown` resolves the listener is closed, idle connections
//!   are closed, and requests in flight are finished and answered (`Connection: close`) before
//!   their connections close; connections still open after `shutdown_grace` are dropped.
//!
//! Request bodies are bounded in size by the router (`--max_body_bytes`) and in time by the
//! request time limit (`--timeout_ms`, which counts from the request head).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::metrics::Metrics;

/// Default of `--max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default of `--header_timeout_ms`.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection limits and timeouts.
#[derive(Debug, Clone)]
pub struct ConnectionOptions {
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
    /// Time a connection has to send a complete request head (after opening, or after its
    /// previous response).
    pub header_timeout: Duration,
    /// How long shutdown waits for connections to finish their requests before dropping them.
    pub shutdown_grace: Duration,
}

impl Default for ConnectionOptions {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            shutdown_grace: Duration::from_secs(70),
        }
    }
}

/// Serves `app` on the connections of `listener` until `shutdown` resolves, then shuts down
/// gracefully (see the module documentation). Returns once every connection is closed.
pub async fn serve_connections(
    listener: TcpListener,
    app: Router,
    options: &ConnectionOptions,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(options.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_timeout);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        // A free slot first: at the limit, new connections stay in the listen backlog.
        let slot = tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = connections.join_next() => continue,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break, // never closed
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::error!(error = %e, "cannot accept connections");
                    tokio::select! {
                        () = &mut shutdown => break,
                        () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let open = metrics.open_connection();
        let conn =
            builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        let metrics = metrics.clone();
        connections.spawn(async move {
            if let Err(e) = conn.await {
                if e.is_timeout() {
                    metrics.record_header_timeout();
                    tracing::debug!(%peer, "closed: no complete request head in time");
                } else {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            }
            drop(open);
            drop(slot);
        });
    }
    drop(listener);
    let open = connections.len();
    if open > 0 {
        tracing::info!(
            connections = open,
            "finishing the requests of open connections"
        );
    }
    let finished = tokio::time::timeout(options.shutdown_grace, async {
        graceful.shutdown().await;
        while connections.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            connections = connections.len(),
            grace_ms = options.shutdown_grace.as_millis() as u64,
            "connections still open after the shutdown grace period; closing them"
        );
        connections.shutdown().await;
    }
}

/// Errors of one connection attempt (the client gave up), as opposed to errors of the listener.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset | BrokenPipe | Interrupted
    )
}
