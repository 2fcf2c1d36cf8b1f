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

use anyhow::Context as _;

pub use app::{router, AppState};
pub use cli::Args;

/// Runs the demo server until SIGINT or SIGTERM.
///
/// On startup it prints `listening on http://HOST:PORT` on stdout (tests and scripts parse it,
/// which matters with `--port 0`).
pub async fn run(args: Args) -> anyhow::Result<()> {
    args.validate().map_err(anyhow::Error::msg)?;
    let state = AppState::new(&args)?;
    let signals = kb_cli::server::ShutdownSignals::install()?;
    let (listener, addr) = kb_cli::server::listen(&args.host, args.port).await?;
    tracing::info!(%addr, server = %state.server(), "kb-demo listening");
    let shutdown = async move {
        let name = signals.recv().await;
        tracing::info!(signal = name, "shutting down");
    };
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("the HTTP server failed")?;
    tracing::info!("stopped");
    Ok(())
}
