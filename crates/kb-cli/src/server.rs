//! Listening and graceful shutdown, as kb-serve and kb-demo do them.

use std::io::Write as _;
use std::net::SocketAddr;

use tokio::net::TcpListener;

/// Binds `host:port` (port 0 picks a free one) and prints `listening on http://ADDR` on stdout —
/// the line scripts and tests read to learn the port. The error names the address.
pub async fn listen(host: &str, port: u16) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind((host, port)).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {host}:{port}: {e}"))
    })?;
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on http://{addr}");
    let _ = out.flush();
    Ok((listener, addr))
}

/// SIGINT and SIGTERM (Ctrl-C where there are no Unix signals), registered when created — before
/// the server starts, so that no signal is missed.
pub struct ShutdownSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Registers the handlers.
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let context = |name: &str| {
                move |e: std::io::Error| {
                    std::io::Error::new(e.kind(), format!("cannot install the {name} handler: {e}"))
                }
            };
            Ok(Self {
                term: signal(SignalKind::terminate()).map_err(context("SIGTERM"))?,
                int: signal(SignalKind::interrupt()).map_err(context("SIGINT"))?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Waits for the first signal and returns its name (`SIGTERM`, `SIGINT`).
    pub async fn recv(mut self) -> &'static str {
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
