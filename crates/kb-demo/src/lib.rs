//! # kb-demo
//!
//! The browser demo page of kobart-keywords, the counterpart of the original Streamlit chat
//! page: a small Korean web app served by this crate that talks to a running `kb-serve`
//! through a same-origin proxy.
//!
//! - [`cli`]: options (flags and `KB_DEMO_…` environment variables);
//! - [`app`]: the router: the embedded page and the proxy routes;
//! - [`run`]: bind, print the `listening on` line, serve until SIGINT/SIGTERM.
//!
//! Every asset (HTML, CSS, JavaScript, icon) is embedded in the binary, so the page works with
//! no network access beyond kb-serve.

#![warn(missing_docs)]

pub mod app;
pub mod cli;

use std::io::Write as _;

use anyhow::Context as _;
use tokio::net::TcpListener;

pub use app::{router, AppState};
pub use cli::Args;

/// Runs the demo server until SIGINT or SIGTERM.
///
/// On startup it prints `listening on http://HOST:PORT` on stdout (tests and scripts parse it,
/// which matters with `--port 0`).
pub async fn run(args: Args) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    let state = AppState::new(&args)?;
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
    tracing::info!(%addr, server = %state.server(), "kb-demo listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("the HTTP server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM (Ctrl-C elsewhere).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
