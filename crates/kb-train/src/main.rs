//! `kb-train`: Fine-tune a KoBART keyword extractor on query/keyword TSV files.

use clap::Parser;

/// Fine-tune a KoBART keyword extractor on query/keyword TSV files.
///
/// This command is not implemented yet in this version of kobart-keywords; see README.md for
/// what exists now.
#[derive(Debug, Parser)]
#[command(name = "kb-train", version)]
struct Args {}

fn main() {
    let _ = Args::parse();
    eprintln!("kb-train: not implemented yet in this version (see README.md)");
    std::process::exit(2);
}
