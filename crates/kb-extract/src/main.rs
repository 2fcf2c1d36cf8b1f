//! `kb-extract`: keywords for Korean questions from the command line, with a KoBART model.

mod input;
mod output;

use std::io::Write;

use anyhow::{Context, Result};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use kb_core::generation::EarlyStopping;
use kb_core::{parse_device, parse_dtype, KeywordModel, DEFAULT_MODEL};

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
    /// Model folder (config.json, tokenizer.json, model.safetensors or pytorch_model.bin) or a
    /// Hugging Face hub id resolved through the local cache (HF_HOME).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
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
    /// Beam count (1 = greedy).
    #[arg(long = "num_beams", alias = "num-beams")]
    num_beams: Option<usize>,
    /// Maximum decoder length, counting the decoder start token.
    #[arg(long = "max_length", alias = "max-length")]
    max_length: Option<usize>,
    /// Maximum number of generated tokens (overrides --max_length).
    #[arg(long = "max_new_tokens", alias = "max-new-tokens")]
    max_new_tokens: Option<usize>,
    /// Minimum decoder length counting the start token (end-of-sequence is banned before it).
    #[arg(long = "min_length", alias = "min-length")]
    min_length: Option<usize>,
    /// Length penalty exponent for beam scores (>1 favours longer outputs).
    #[arg(long = "length_penalty", alias = "length-penalty")]
    length_penalty: Option<f64>,
    /// Never repeat an n-gram of this size (0 = off).
    #[arg(long = "no_repeat_ngram_size", alias = "no-repeat-ngram-size")]
    no_repeat_ngram_size: Option<usize>,
    /// Beam stopping rule: true (stop when num_beams are finished), false (heuristic), never.
    #[arg(long = "early_stopping", alias = "early-stopping", num_args = 0..=1, default_missing_value = "true")]
    early_stopping: Option<EarlyStopping>,
    /// Truncate each query to at most this many tokens.
    #[arg(long = "max_input_tokens", alias = "max-input-tokens")]
    max_input_tokens: Option<usize>,
    /// Weights dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: kb_core::candle_core::DType,
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Queries per generation batch (queries are grouped by length for speed; output order is
    /// the input order).
    #[arg(long = "batch_size", alias = "batch-size", default_value_t = 16)]
    batch_size: usize,
    /// Synonyms file (`canonical<TAB>variant…` lines, see configs/synonyms.tsv): keywords that
    /// are listed variants are replaced by their canonical term, then repeats are removed
    /// (`text` stays the generated text).
    #[arg(long, value_name = "FILE")]
    synonyms: Option<std::path::PathBuf>,
}

fn main() {
    kb_core::threads::fix_thread_count();
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
    anyhow::ensure!(args.batch_size > 0, "--batch_size must be at least 1");
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
    let device = parse_device(&args.device)?;
    let model = KeywordModel::load(&args.model, args.dtype, &device)
        .with_context(|| format!("cannot load model {}", args.model))?;
    let note = model.report.summary();
    if !note.is_empty() {
        eprintln!("kb-extract: note: {note}");
    }
    let mut gen = model.generation.clone();
    if let Some(v) = args.num_beams {
        gen.num_beams = v;
    }
    if let Some(v) = args.max_length {
        gen.max_length = v;
        gen.max_new_tokens = None;
    }
    if args.max_new_tokens.is_some() {
        gen.max_new_tokens = args.max_new_tokens;
    }
    if let Some(v) = args.min_length {
        gen.min_length = v;
    }
    if let Some(v) = args.length_penalty {
        gen.length_penalty = v;
    }
    if let Some(v) = args.no_repeat_ngram_size {
        gen.no_repeat_ngram_size = v;
    }
    if let Some(v) = args.early_stopping {
        gen.early_stopping = v;
    }
    gen.validate()
        .map_err(|(field, msg)| anyhow::anyhow!("--{field}: {msg}"))?;

    // Queries of similar token length are generated together; results keep input order.
    let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
    let bar = if args.input.is_some() {
        ProgressBar::new(queries.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} queries  {per_sec}  eta {eta}")
            .expect("valid template"),
    );
    let mut results =
        model.extract_all(&refs, &gen, args.max_input_tokens, args.batch_size, |n| {
            bar.inc(n as u64)
        })?;
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
