//! `kb-extract`: keywords for Korean questions from the command line, with a KoBART model.

#![warn(missing_docs)]

mod input;
mod output;

use std::io::Write;

use anyhow::{Context, Result};
use clap::Parser;
use kb_cli::model::{GenerationArgs, ModelArgs};

use output::{Format, ResultWriter};

/// Extract keywords from Korean questions with a fine-tuned KoBART model.
///
/// Queries come from the arguments, or from --input: a text file with one query per line, or a
/// TSV with a `query` column (the training data format); `-` reads standard input.
/// Generation settings default to the model folder's generation_config.json (else config.json,
/// else transformers' defaults); the flags below override them.
///
/// Examples:
///   kb-extract --model runs/kobart_keyword "이사화물 통관예약을 하면 뭐가 좋나요?"
///   kb-extract --model runs/kobart_keyword --num_beams 5 --input data/test.tsv --format jsonl --ids --output out.jsonl
#[derive(Debug, Parser)]
#[command(name = "kb-extract", version, verbatim_doc_comment)]
struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Queries to process (ignored when --input is given).
    queries: Vec<String>,
    /// Read queries from FILE (one per line, or a TSV with a `query` column); `-` for stdin.
    #[arg(long, value_name = "FILE")]
    input: Option<String>,
    /// Write results to FILE instead of standard output.
    #[arg(long, value_name = "FILE")]
    output: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Tsv)]
    format: Format,
    /// Also write the generated token ids (without the decoder start token).
    #[arg(long)]
    ids: bool,
    /// Also write beam search's length-normalised log-probability (transformers'
    /// `sequences_scores`; empty for greedy decoding).
    #[arg(long)]
    scores: bool,
    #[command(flatten)]
    generation: GenerationArgs,
    /// Queries per generation batch (queries are grouped by length for speed; output order is
    /// the input order).
    #[arg(long = "batch_size", alias = "batch-size", default_value_t = 16,
          value_parser = kb_cli::at_least_one())]
    batch_size: usize,
    /// Synonyms file (`canonical<TAB>variant…` lines, see configs/synonyms.tsv): keywords that
    /// are listed variants are replaced by their canonical term, then repeats are removed
    /// (`text` stays the generated text).
    #[arg(long, value_name = "FILE")]
    synonyms: Option<std::path::PathBuf>,
}

fn main() {
    kb_core::threads::fix_thread_count();
    kb_cli::init_stderr_log("kb-extract");
    if let Err(e) = run(Args::parse()) {
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            return; // e.g. `kb-extract … | head`
        }
        eprintln!("kb-extract: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let queries = match &args.input {
        Some(src) => input::read_queries(src)?,
        None => args.queries.clone(),
    };
    anyhow::ensure!(
        !queries.is_empty(),
        "no queries: pass them as arguments or with --input FILE (see --help)"
    );
    let synonyms = args
        .synonyms
        .as_deref()
        .map(kb_core::synonyms::Synonyms::read)
        .transpose()?;
    let model = args
        .model
        .load()
        .with_context(|| format!("cannot load model {}", args.model.spec()))?;
    let gen = args
        .generation
        .for_model(&model)
        .map_err(anyhow::Error::msg)?;

    // Queries of similar token length are generated together; results keep input order.
    let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
    let bar = kb_cli::progress::query_bar(queries.len(), args.input.is_some());
    let mut results = model.extract_all(
        &refs,
        &gen,
        args.generation.max_input_tokens,
        args.batch_size,
        |n| bar.inc(n as u64),
    )?;
    if let Some(syn) = &synonyms {
        for r in &mut results {
            r.keywords = syn.apply(&r.keywords);
        }
    }
    bar.finish_and_clear();

    let sink: Box<dyn Write> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot create {path}"))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut writer = ResultWriter::new(sink, args.format, args.ids, args.scores)?;
    for r in &results {
        writer.write(r)?;
    }
    writer.finish()
}
