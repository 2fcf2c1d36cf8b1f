//! `kb-train`: fine-tune a KoBART keyword extractor on `query`/`keyword` TSV files.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use kb_core::train::{train, Accelerator, InitMode, Precision, RunOptions, TrainSettings};

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
#[derive(Debug, Parser)]
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
    /// Pretrained model: folder or hub id [default: gogamza/kobart-base-v1].
    #[arg(long)]
    model: Option<String>,
    /// `pretrained` (from --model) or `scratch` (random init from --model_config, tokenizer
    /// trained on the training file; works offline).
    #[arg(long)]
    init: Option<InitMode>,
    /// config.json of the model built by --init scratch (e.g. configs/tiny-bart.json).
    #[arg(long = "model_config", alias = "model-config", value_name = "FILE")]
    model_config: Option<PathBuf>,
    /// Vocabulary size of the tokenizer trained by --init scratch [default: 8000].
    #[arg(long = "tokenizer_vocab_size", alias = "tokenizer-vocab-size")]
    tokenizer_vocab_size: Option<usize>,
    /// Training TSV [default: data/train.tsv].
    #[arg(long = "train_file", alias = "train-file", value_name = "FILE")]
    train_file: Option<PathBuf>,
    /// Validation TSV [default: data/test.tsv].
    #[arg(long = "test_file", alias = "test-file", value_name = "FILE")]
    test_file: Option<PathBuf>,
    /// Run folder for checkpoints and metrics [default: checkpoint].
    #[arg(long, value_name = "DIR")]
    checkpoint: Option<PathBuf>,
    /// Epochs [default: 2].
    #[arg(long = "max_epochs", alias = "max-epochs")]
    max_epochs: Option<usize>,
    /// Stop after this many optimizer steps (also the schedule's length).
    #[arg(long = "max_steps", alias = "max-steps")]
    max_steps: Option<usize>,
    /// Rows per batch [default: 8].
    #[arg(long = "batch_size", alias = "batch-size")]
    batch_size: Option<usize>,
    /// Batches per optimizer step [default: 1].
    #[arg(long = "accumulate_grad_batches", alias = "accumulate-grad-batches")]
    accumulate_grad_batches: Option<usize>,
    /// Peak learning rate [default: 3e-5].
    #[arg(long)]
    lr: Option<f64>,
    /// AdamW weight decay, not applied to biases [default: 0.01].
    #[arg(long = "weight_decay", alias = "weight-decay")]
    weight_decay: Option<f64>,
    /// Fraction of steps of linear warmup [default: 0.1].
    #[arg(long = "warmup_ratio", alias = "warmup-ratio")]
    warmup_ratio: Option<f64>,
    /// Clip gradients to this global norm, 0 = off [default: 1.0].
    #[arg(long = "gradient_clip_val", alias = "gradient-clip-val")]
    gradient_clip_val: Option<f64>,
    /// Tokens kept per query and keyword list [default: 512].
    #[arg(long = "max_len", alias = "max-len")]
    max_len: Option<usize>,
    /// Seed for initialisation, data order and dropout [default: 42].
    #[arg(long)]
    seed: Option<u64>,
    /// Threads that tokenize and batch ahead of the model [default: 4].
    #[arg(long = "num_workers", alias = "num-workers")]
    num_workers: Option<usize>,
    /// cpu or gpu (gpu needs a build with --features cuda) [default: cpu].
    #[arg(long)]
    accelerator: Option<Accelerator>,
    /// GPUs per node, one data-parallel worker each; the global batch is batch_size × GPUs ×
    /// nodes (several GPUs need a build with --features cuda,nccl) [default: 1].
    #[arg(long = "num_gpus", alias = "num-gpus")]
    num_gpus: Option<usize>,
    /// Which GPUs to use, as CUDA ordinals, e.g. 0,2 [default: the first num_gpus].
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    devices: Option<Vec<usize>>,
    /// Data-parallel workers on the CPU (--accelerator cpu): each trains on its shard of every
    /// global batch of batch_size × N rows and gradients are summed in process [default: 1].
    #[arg(long = "dp_workers", alias = "dp-workers")]
    dp_workers: Option<usize>,
    /// Machines in a multi-node GPU run (each runs kb-train with its --node_rank) [default: 1].
    #[arg(long = "num_nodes", alias = "num-nodes")]
    num_nodes: Option<usize>,
    /// This machine's index in a multi-node run; node 0 writes checkpoints [default: 0].
    #[arg(long = "node_rank", alias = "node-rank")]
    node_rank: Option<usize>,
    /// How nodes meet: file:PATH (shared filesystem) or tcp:HOST:PORT (node 0 listens).
    #[arg(long, value_name = "SPEC")]
    rendezvous: Option<String>,
    /// 32 or bf16 (bf16 compute, f32 master weights, optimizer and checkpoints) [default: 32].
    #[arg(long)]
    precision: Option<Precision>,
    /// Batch rows of similar length together: true or false [default: true].
    #[arg(long)]
    bucket: Option<bool>,
    /// Also validate every N optimizer steps.
    #[arg(long = "val_check_interval", alias = "val-check-interval")]
    val_check_interval: Option<usize>,
    /// Checkpoints kept by validation loss [default: 3].
    #[arg(long = "save_top_k", alias = "save-top-k")]
    save_top_k: Option<usize>,
    /// Save `last` every N optimizer steps.
    #[arg(long = "save_every_n_steps", alias = "save-every-n-steps")]
    save_every_n_steps: Option<usize>,
    /// Skip malformed data rows (reporting them) instead of stopping.
    #[arg(long = "skip_bad_rows", alias = "skip-bad-rows")]
    skip_bad_rows: bool,
}

impl Args {
    fn settings(&self) -> Result<TrainSettings> {
        let mut s = match &self.config {
            Some(path) => TrainSettings::from_toml_file(path)?,
            None => TrainSettings::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = self.$field.clone() { s.$field = v; } )* };
        }
        set!(
            model,
            init,
            tokenizer_vocab_size,
            train_file,
            test_file,
            checkpoint,
            max_epochs,
            batch_size,
            accumulate_grad_batches,
            lr,
            weight_decay,
            warmup_ratio,
            gradient_clip_val,
            max_len,
            seed,
            num_workers,
            accelerator,
            num_gpus,
            dp_workers,
            num_nodes,
            node_rank,
            precision,
            bucket,
            save_top_k
        );
        if self.model_config.is_some() {
            s.model_config = self.model_config.clone();
        }
        if self.devices.is_some() {
            s.devices = self.devices.clone();
        }
        if self.rendezvous.is_some() {
            s.rendezvous = self.rendezvous.clone();
        }
        if self.max_steps.is_some() {
            s.max_steps = self.max_steps;
        }
        if self.val_check_interval.is_some() {
            s.val_check_interval = self.val_check_interval;
        }
        if self.save_every_n_steps.is_some() {
            s.save_every_n_steps = self.save_every_n_steps;
        }
        if self.skip_bad_rows {
            s.skip_bad_rows = true;
        }
        Ok(s)
    }
}

fn main() {
    kb_core::threads::fix_thread_count();
    let args = Args::parse();
    kb_core::allocator::retain_freed_memory();
    if let Err(e) = run(&args) {
        eprintln!("kb-train: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let settings = args.settings()?;
    let outcome = train(
        &settings,
        &RunOptions {
            resume: args.resume.clone(),
            stop_after: args.stop_after,
            progress: true,
        },
    )?;
    let chp = outcome.run_dir.join("model_chp");
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
    Ok(())
}
