//! `kb-demo`: Serve the browser demo page for a running kb-serve.

use clap::Parser;

/// Serve the browser demo page for a running kb-serve.
///
/// This command is not implemented yet in this version of kobart-keywords; see README.md for
/// what exists now.
#[derive(Debug, Parser)]
#[command(name = "kb-demo", version)]
struct Args {}

fn main() {
    let _ = Args::parse();
    eprintln!("kb-demo: not implemented yet in this version (see README.md)");
    std::process::exit(2);
}
