//! `kb-serve`: the keyword HTTP server. See `kb-serve --help`.

#![warn(missing_docs)]

use std::process::ExitCode;

use clap::Parser;
use kb_serve::{Args, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    kb_core::threads::fix_thread_count();
    let args = Args::parse();
    kb_core::allocator::limit_arenas(2);
    // Within a batch, freed buffers are reused instead of unmapped and faulted in again every
    // decoding step; after each batch the backend hands the freed memory back.
    kb_core::allocator::retain_freed_memory();
    init_logging(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kb-serve: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kb_serve::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "kb-serve failed");
            eprintln!("kb-serve: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr (stdout carries the `listening on` line); verbosity follows RUST_LOG.
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
