//! `kb-train`: fine-tune a KoBART keyword extractor on `query`/`keyword` TSV files.

#![warn(missing_docs)]

use std::path::PathBuf;

use std::sync::Arc;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches};
use indicatif::{ProgressBar, ProgressStyle};
use kb_core::train::{train, RunOptions, StepReport, StopRequest, TrainProgress, TrainSettings};

mod signals;

/// Fine-tune a KoBART (BART) keyword extractor on TSV files with `query` and `keyword` columns.
///
/// Settings come from the original recipe's defaults, then --config FILE (TOML with the same
/// names), then these flags. Flags accept the original's snake_case spelling and kebab-case.
/// Checkpoints go to CHECKPOINT/model_chp/: the 3 best by validation loss
/// (`epoch=01-val_loss=0.307`) and `last`; each is also a model folder kb-extract can load.
/// CHECKPOINT/metrics.jsonl and CHECKPOINT/loss.svg record the run.
///
/// Examples:
///   kb-train --config configs/quickstart-cpu.toml
///   kb-train --gradient_clip_val 1.0 --max_epochs 2 --checkpoint checkpoint --accelerator gpu --num_gpus 1 --batch_size 8
///   kb-train --accelerator gpu --num_gpus 4 --precision bf16 --config configs/original.toml
///   kb-train --accelerator cpu --dp_workers 2 --config configs/quickstart-cpu.toml
///   kb-train --resume checkpoint
///   kb-train --derive_terms configs/derived_terms.tsv --train_file data/train.tsv
///
/// SIGINT (Ctrl-C) or SIGTERM stops a run after the current optimizer step: `last` is saved
/// there, one line names the step and the command that continues, and the exit status is
/// 128 + the signal's number (130 for SIGINT, 143 for SIGTERM). A second signal ends the process
/// at once, with the same status, keeping the checkpoints saved before.
#[derive(Debug, clap::Parser)]
#[command(
    name = "kb-train",
    version,
    verbatim_doc_comment,
    args_override_self = true
)]
struct Args {
    /// TOML file with settings (see configs/); flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Continue a run: a run folder (uses model_chp/last) or a checkpoint folder. The run's saved
    /// settings are used.
    #[arg(long, value_name = "PATH")]
    resume: Option<PathBuf>,
    /// Stop after N optimizer steps of this invocation, saving `last` (continue with --resume).
    #[arg(long = "stop_after", alias = "stop-after", value_name = "N")]
    stop_after: Option<usize>,
    /// Do not train: write the derived terms of --train_file's labels (keywords that are not
    /// spans of their question, used at least twice) to FILE as `term<TAB>count`, and exit.
    /// Every checkpoint also carries them (derived_terms.tsv) for grounded decoding.
    #[arg(long = "derive_terms", alias = "derive-terms", value_name = "FILE")]
    derive_terms: Option<PathBuf>,
}

/// The command line: the flags above and one flag per field of the recipe
/// (`kb_core::train::TrainSettings`), each optional and overlaid on the recipe
/// ([`TrainSettings::prepare_command`]).
fn command() -> clap::Command {
    TrainSettings::prepare_command(<TrainSettings as clap::Args>::augment_args(Args::command()))
}

/// The settings of this run: the recipe's defaults, then --config, then the flags given.
fn settings(args: &Args, matches: &clap::ArgMatches) -> Result<TrainSettings> {
    let base = match &args.config {
        Some(path) => TrainSettings::from_toml_file(path)?,
        None => TrainSettings::default(),
    };
    Ok(TrainSettings::overlay_flags(&base, matches)?)
}

/// kb-train's progress bar: one per epoch, with the step's loss, learning rate and speed.
struct EpochBar(std::sync::Mutex<ProgressBar>);

impl TrainProgress for EpochBar {
    fn epoch_started(&self, epoch: usize, epochs: usize, batches: usize, done: usize) {
        let bar = ProgressBar::new(batches as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} {bar:30} {pos}/{len} batches  {msg}  eta {eta}",
            )
            .expect("valid template"),
        );
        bar.set_prefix(format!("{}/{epochs}", epoch + 1));
        bar.set_position(done as u64);
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = bar;
    }

    fn batches_done(&self, done: usize) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_position(done as u64);
    }

    fn step(&self, s: &StepReport) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.1} rows/s  {:.0} tok/s",
                s.train_loss, s.lr, s.rows_per_s, s.tokens_per_s
            ));
    }

    fn epoch_finished(&self) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .finish_and_clear();
    }
}

fn main() {
    kb_core::threads::fix_thread_count();
    kb_cli::init_stderr_log("kb-train");
    let matches = command().get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    kb_core::allocator::retain_freed_memory();
    match run(&args, &matches) {
        Ok(0) => {}
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("kb-train: error: {}", kb_cli::error_line(e.as_ref()));
            std::process::exit(1);
        }
    }
}

/// Runs the command; returns the exit status (0, or 128 + N after a stop by signal N).
fn run(args: &Args, matches: &clap::ArgMatches) -> Result<i32> {
    let settings = settings(args, matches)?;
    if let Some(out) = &args.derive_terms {
        let data = kb_core::data::Dataset::read_tsv(&settings.train_file, settings.skip_bad_rows)?;
        let terms = kb_core::train::derived_terms_of(&data);
        terms.write(out)?;
        eprintln!(
            "kb-train: wrote {} derived terms of {} ({} rows) to {}",
            terms.terms.len(),
            settings.train_file.display(),
            data.examples.len(),
            out.display()
        );
        return Ok(0);
    }
    let stop = StopRequest::new();
    signals::stop_on_signals(&stop)?;
    let outcome = train(
        &settings,
        &RunOptions {
            resume: args.resume.clone(),
            stop_after: args.stop_after,
            progress: Some(Arc::new(EpochBar(std::sync::Mutex::new(
                ProgressBar::hidden(),
            )))),
            stop: stop.clone(),
        },
    )?;
    let chp = outcome.run_dir.join("model_chp");
    if outcome.stopped {
        let (name, code) = signals::describe(stop.cause());
        eprintln!(
            "kb-train: stopped by {name} after step {}/{}; continue with: kb-train --resume {}",
            outcome.global_step,
            outcome.total_steps,
            signals::shell_quote(&outcome.run_dir.display().to_string())
        );
        return Ok(code);
    }
    if outcome.interrupted {
        eprintln!(
            "kb-train: stopped after step {}/{} as asked; continue with: kb-train --resume {}",
            outcome.global_step,
            outcome.total_steps,
            outcome.run_dir.display()
        );
    } else {
        eprintln!(
            "kb-train: done: {} steps in {:.1} s; final val_loss {}",
            outcome.global_step,
            outcome.elapsed_s,
            outcome
                .val_loss
                .map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    for (i, b) in outcome.best.iter().enumerate() {
        eprintln!(
            "  best {}: {} (val_loss {:.4})",
            i + 1,
            chp.join(&b.name).display(),
            b.val_loss
        );
    }
    eprintln!(
        "  last: {}\n  metrics: {}\n  loss curve: {}",
        chp.join("last").display(),
        outcome.run_dir.join("metrics.jsonl").display(),
        outcome.run_dir.join("loss.svg").display()
    );
    Ok(0)
}
