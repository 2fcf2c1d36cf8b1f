//! Listening and graceful shutdown, as kb-serve and kb-demo do them.

use std::io::Write as _;
use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpSocket};

/// Connections the kernel completes and keeps for a listener until the server accepts them
/// (capped by the system's `net.core.somaxconn`): where a burst of clients, or the clients beyond
/// a server's connection limit, wait. Larger than the standard library's 128, which a burst of a
/// few hundred clients overflows (their handshakes are then retried with back-off, for seconds).
pub const LISTEN_BACKLOG: u32 = 1024;

/// Binds `host:port` (port 0 picks a free one) and prints `listening on http://ADDR` on stdout —
/// the line scripts and tests read to learn the port. The error names the address.
pub async fn listen(host: &str, port: u16) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = bind(host, port).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot listen on {host}:{port}: {e}"))
    })?;
    let addr = listener.local_addr()?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "listening on http://{addr}");
    let _ = out.flush();
    Ok((listener, addr))
}

/// Binds `host:port` (port 0 picks a free one) with a listen backlog of [`LISTEN_BACKLOG`],
/// trying each address the host resolves to; prints nothing.
pub async fn bind(host: &str, port: u16) -> std::io::Result<TcpListener> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let bound = (|| {
            let socket = if addr.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            #[cfg(unix)]
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(LISTEN_BACKLOG)
        })();
        match bound {
            Ok(listener) => return Ok(listener),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the host resolves to no address",
        )
    }))
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
            let context = |name: &'static str| {
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
