//! `kb-export`: a kb-train checkpoint → a Hugging Face model folder.

#![warn(missing_docs)]

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use kb_core::export::{best_checkpoint, export, ExportOptions};
use kb_core::parse_dtype;

/// Turn a kb-train checkpoint into a Hugging Face model folder (what the original
/// get_model_binary.py did) that transformers' BartForConditionalGeneration.from_pretrained,
/// PreTrainedTokenizerFast, kb-extract and kb-serve load.
///
/// Writes config.json, generation_config.json (beam 5 as the original server), model.safetensors
/// (transformers' tensor names), tokenizer.json, tokenizer_config.json, special_tokens_map.json and
/// a model card (README.md). The folder is written under a temporary name and renamed into place.
///
/// Examples:
///   kb-export --checkpoint checkpoint/model_chp/epoch=01-val_loss=0.307 --output_dir kobart_keyword
///   kb-export --best checkpoint --output_dir kobart_keyword --dtype f16
///   kb-export --model_binary checkpoint/model_chp/last --hparams checkpoint/model_chp/last/hparams.json --output_dir out
#[derive(Debug, Parser)]
#[command(name = "kb-export", version, verbatim_doc_comment)]
struct Args {
    /// A checkpoint folder (RUN/model_chp/NAME). The original's `--model_binary` is accepted too.
    #[arg(
        long,
        alias = "model_binary",
        alias = "model-binary",
        value_name = "DIR"
    )]
    checkpoint: Option<PathBuf>,
    /// Export the checkpoint with the lowest val_loss of this run folder.
    #[arg(long, value_name = "RUN", conflicts_with = "checkpoint")]
    best: Option<PathBuf>,
    /// Settings to check against the checkpoint's (its hparams.json, or a TOML recipe).
    #[arg(long, value_name = "FILE")]
    hparams: Option<PathBuf>,
    /// Destination folder.
    #[arg(long = "output_dir", alias = "output-dir", value_name = "DIR")]
    output_dir: PathBuf,
    /// Weights dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: kb_core::candle_core::DType,
    /// Replace a non-empty destination folder.
    #[arg(long)]
    force: bool,
}

fn main() {
    kb_cli::init_stderr_log("kb-export");
    if let Err(e) = run(Args::parse()) {
        eprintln!("kb-export: error: {}", kb_cli::error_line(e.as_ref()));
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let checkpoint = match (&args.checkpoint, &args.best) {
        (Some(c), None) => c.clone(),
        (None, Some(run)) => best_checkpoint(run)?,
        _ => bail!("pass --checkpoint DIR (or --model_binary DIR) or --best RUN"),
    };
    let summary = export(&ExportOptions {
        checkpoint: checkpoint.clone(),
        output_dir: args.output_dir.clone(),
        dtype: args.dtype,
        force: args.force,
        hparams: args.hparams.clone(),
    })?;
    println!(
        "exported {} → {} ({} tensors, {:.1} MB, val_loss {})",
        checkpoint.display(),
        summary.output_dir.display(),
        summary.tensors,
        summary.weight_bytes as f64 / 1e6,
        summary
            .val_loss
            .map(|v| format!("{v:.4}"))
            .unwrap_or_else(|| "unknown".into())
    );
    Ok(())
}
