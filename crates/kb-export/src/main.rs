//! `kb-export`: Turn a kb-train checkpoint into a Hugging Face model folder.

use clap::Parser;

/// Turn a kb-train checkpoint into a Hugging Face model folder.
///
/// This command is not implemented yet in this version of kobart-keywords; see README.md for
/// what exists now.
#[derive(Debug, Parser)]
#[command(name = "kb-export", version)]
struct Args {}

fn main() {
    let _ = Args::parse();
    eprintln!("kb-export: not implemented yet in this version (see README.md)");
    std::process::exit(2);
}
