//! A training run: the original Lightning recipe (AdamW, linear warmup, clipping, gradient
//! accumulation, validation each epoch, top-k checkpoints by val_loss) with exact resume —
//! settings, data and initial weights here; the loop itself in the worker module.

use std::path::{Path, PathBuf};

use candle_core::Device;

use super::checkpoint::{
    find_last, read_checkpoint, recover_checkpoints, RankedCheckpoint, TrainerState,
};
use super::launch::{run_cpu_workers, run_gpu_workers};
use super::optim::warmup_steps;
use super::run::{RunContext, RunOptions, Setup};
use super::scratch::{scratch_config, train_tokenizer};
use super::settings::{Accelerator, InitMode, Objective, TrainSettings};
use super::trainable::Trainable;
use crate::data::{encode_examples, Dataset, Encoded};
use crate::error::{Error, Result};
use crate::generation::{DerivedTerms, EarlyStopping, GenerationConfig};
use crate::source::ModelSource;
use crate::tokenizer::KoTokenizer;
use crate::weights::{load_checked, WeightFiles};

/// How a run ended.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Optimizer steps taken in total.
    pub global_step: usize,
    /// Total steps of the schedule.
    pub total_steps: usize,
    /// Kept checkpoints, best first.
    pub best: Vec<RankedCheckpoint>,
    /// Latest validation loss.
    pub val_loss: Option<f64>,
    /// Training loss of the last step.
    pub last_train_loss: Option<f64>,
    /// Whether the run ended before its schedule (`stop_after` or the stop request), with
    /// `last` saved where it stopped.
    pub interrupted: bool,
    /// Whether the stop request ([`RunOptions::stop`]) ended it.
    pub stopped: bool,
    /// Training seconds (resumed runs included).
    pub elapsed_s: f64,
    /// Run folder.
    pub run_dir: PathBuf,
}

/// The generation defaults shipped with trained models: the original server's beam 5, ending at
/// the model's eos, within the model's positions. An error when config.json's own generation
/// fields are invalid (`early_stopping` 5, `eos_token_id` []), naming the field.
pub fn serving_generation_config(cfg: &crate::BartConfig) -> Result<GenerationConfig> {
    let mut g = GenerationConfig::from_model_config(cfg)?;
    g.num_beams = 5;
    g.max_length = 512.min(cfg.max_position_embeddings);
    g.early_stopping = EarlyStopping::Heuristic;
    g.forced_eos_token_id = cfg.forced_eos_token_id.or(Some(g.eos_token_ids[0]));
    Ok(g)
}

/// Fails early, with what to do, when the build or machine cannot run `settings`.
fn check_accelerator(settings: &TrainSettings) -> Result<()> {
    if settings.accelerator == Accelerator::Gpu {
        if !candle_core::utils::cuda_is_available() {
            return Err(Error::Invalid(
                "--accelerator gpu needs a build with CUDA: rebuild with `cargo build --release --features cuda` (CUDA toolkit and CUDA_COMPUTE_CAP set; see README)".into(),
            ));
        }
        if settings.world_size() > 1 && !cfg!(feature = "nccl") {
            return Err(Error::Invalid(format!(
                "training on {} GPUs needs NCCL: rebuild with `cargo build --release --features cuda,nccl` (see README), or use --num_gpus 1",
                settings.world_size()
            )));
        }
    }
    Ok(())
}

fn fresh_setup(settings: &TrainSettings, train: &Dataset) -> Result<Setup> {
    let host = Device::Cpu;
    let (config, tensors, tokenizer, config_json) = match settings.init {
        InitMode::Pretrained => {
            let dir = ModelSource::parse(&settings.model).resolve()?;
            let cfg_path = dir.join("config.json");
            let cfg = crate::BartConfig::from_file(&cfg_path)?;
            let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
            let config_json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Config {
                    path: cfg_path.clone(),
                    field: "-".into(),
                    message: e.to_string(),
                })?;
            let tokenizer = KoTokenizer::from_model_dir(&dir, &cfg)?;
            let (tensors, report) = load_checked(
                &WeightFiles::find(&dir)?,
                &cfg,
                candle_core::DType::F32,
                &host,
            )?;
            let note = report.summary();
            if !note.is_empty() {
                tracing::warn!("{note}");
            }
            // load_checked has checked every expected tensor; each worker's replica copies them.
            (cfg, tensors, tokenizer, config_json)
        }
        InitMode::Scratch => {
            let path = settings.model_config.as_ref().expect("validated");
            let alphabet = if settings.tokenizer_hangul_alphabet {
                super::augment::common_hangul_syllables()
            } else {
                Vec::new()
            };
            let tok = train_tokenizer(&train.examples, settings.tokenizer_vocab_size, &alphabet)?;
            let (cfg, config_json) = scratch_config(path, tok.get_vocab_size(true))?;
            let tokenizer = KoTokenizer::new(tok, &cfg, path)?;
            let tensors = Trainable::from_scratch(&cfg, settings.seed, &host)?.tensors();
            (cfg, tensors, tokenizer, config_json)
        }
    };
    let generation = serving_generation_config(&config)?;
    Ok(Setup {
        config,
        tensors,
        moments: None,
        tokenizer,
        config_json,
        generation,
        state: None,
    })
}

fn resumed_setup(dir: &Path) -> Result<Setup> {
    let ck = read_checkpoint(dir, &Device::Cpu)?;
    Ok(Setup {
        config: ck.config,
        tensors: ck.tensors,
        moments: Some((ck.optimizer_step, ck.moments)),
        tokenizer: ck.tokenizer,
        config_json: ck.config_json,
        generation: ck.generation,
        state: Some(ck.state),
    })
}

/// Resolves `--resume` given as a run folder or a checkpoint folder.
pub fn resolve_resume(path: &Path) -> Result<PathBuf> {
    if path.join("trainer_state.json").is_file() {
        return Ok(path.to_path_buf());
    }
    find_last(path).ok_or_else(|| {
        Error::Invalid(format!(
            "nothing to resume in {}: expected a checkpoint folder or a run folder with model_chp/last",
            path.display()
        ))
    })
}

fn encode_with_workers(
    tok: &KoTokenizer,
    ds: &Dataset,
    max_len: usize,
    workers: usize,
) -> Result<Vec<Encoded>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(workers.max(1))
        .build()
        .map_err(|e| Error::Invalid(format!("cannot start {workers} workers: {e}")))?;
    pool.install(|| encode_examples(tok, &ds.examples, max_len))
        .map_err(|e| Error::Invalid(format!("{}: {e}", ds.path.display())))
}

/// Runs (or resumes) training as `settings` describe.
pub fn train(settings: &TrainSettings, options: &RunOptions) -> Result<TrainOutcome> {
    let (settings, resumed) = effective_settings(settings, options)?;
    let train_ds = read_dataset(&settings.train_file, settings.skip_bad_rows)?;
    let val_ds = read_dataset(&settings.test_file, settings.skip_bad_rows)?;
    let mut setup = match resumed {
        Some(setup) => setup,
        None => fresh_setup(&settings, &train_ds)?,
    };
    let (train_ds, val_ds, derived_terms) = match settings.objective {
        Objective::Keywords => {
            let derived_terms = derived_terms_of(&train_ds);
            let train_ds = with_augmented_copies(train_ds, &settings, &derived_terms);
            (train_ds, val_ds, derived_terms)
        }
        // No keyword labels: no derived terms (grounding a denoiser is meaningless).
        Objective::Denoise => (
            denoising_dataset(train_ds, settings.seed),
            denoising_dataset(val_ds, settings.seed.wrapping_add(1)),
            DerivedTerms::default(),
        ),
    };
    let encode =
        |ds| encode_with_workers(&setup.tokenizer, ds, settings.max_len, settings.num_workers);
    let (train_data, val_data) = (encode(&train_ds)?, encode(&val_ds)?);
    let lengths: Vec<usize> = train_data
        .iter()
        .map(|e| e.input_ids.len() + e.labels.len())
        .collect();
    let state = match setup.state.take() {
        Some(state) => state,
        None => initial_state(&settings, train_data.len()),
    };
    let run = settings.checkpoint.clone();
    let chp = run.join("model_chp");
    if settings.node_rank == 0 {
        std::fs::create_dir_all(&chp).map_err(|e| Error::io(&chp, e))?;
        recover_checkpoints(&chp)?;
        announce(&settings, &state, train_data.len(), val_data.len());
    }
    let ctx = RunContext {
        settings: &settings,
        options,
        train_data: &train_data,
        val_data: &val_data,
        lengths: &lengths,
        pad: setup.tokenizer.special().pad,
        run: &run,
        chp: &chp,
        setup: &setup,
        initial_state: state,
        derived_terms: &derived_terms,
    };
    let done = match settings.accelerator {
        Accelerator::Cpu => run_cpu_workers(&ctx)?,
        Accelerator::Gpu => run_gpu_workers(&ctx)?,
    };
    Ok(TrainOutcome {
        global_step: done.state.global_step,
        total_steps: done.state.total_steps,
        best: done.state.best.clone(),
        val_loss: done.state.val_loss,
        last_train_loss: done.last_train_loss,
        interrupted: done.interrupted,
        stopped: done.stopped,
        elapsed_s: done.state.elapsed_s,
        run_dir: run,
    })
}

/// The settings a run uses — the checkpoint's saved ones when resuming (with this machine's
/// `num_workers` and `devices`), else `settings` checked — and, when resuming, its setup.
fn effective_settings(
    settings: &TrainSettings,
    options: &RunOptions,
) -> Result<(TrainSettings, Option<Setup>)> {
    let Some(path) = &options.resume else {
        settings
            .validate()
            .map_err(|(f, m)| Error::Invalid(format!("--{f}: {m}")))?;
        check_accelerator(settings)?;
        return Ok((settings.clone(), None));
    };
    let dir = resolve_resume(path)?;
    let mut saved = read_checkpoint_settings(&dir)?;
    saved.num_workers = settings.num_workers;
    if settings.devices.as_ref().map(Vec::len) == Some(saved.local_workers()) {
        saved.devices = settings.devices.clone();
    }
    check_accelerator(&saved)?;
    tracing::info!("resuming from {} with its saved settings", dir.display());
    Ok((saved, Some(resumed_setup(&dir)?)))
}

/// The derived terms of a training file's labels (keywords that are not spans of their
/// question), those used at least [`DERIVED_TERM_MIN_COUNT`] times: what grounded decoding lets a
/// model trained on it generate besides spans of the input.
pub fn derived_terms_of(ds: &Dataset) -> DerivedTerms {
    let labels: Vec<(String, Vec<String>)> = ds
        .examples
        .iter()
        .map(|e| (e.query.clone(), crate::keywords::split_keywords(&e.keyword)))
        .collect();
    DerivedTerms::from_labels(
        labels.iter().map(|(q, k)| (q.as_str(), k.as_slice())),
        DERIVED_TERM_MIN_COUNT,
    )
}

/// A derived term is kept when at least this many training labels use it (one-off labels, often
/// slips, are left out).
pub const DERIVED_TERM_MIN_COUNT: usize = 2;

/// `ds` with the span-substitution copies `settings.augment_spans` asks for appended (see
/// [`super::augment`]); derived terms are never substituted.
fn with_augmented_copies(
    mut ds: Dataset,
    settings: &TrainSettings,
    derived: &DerivedTerms,
) -> Dataset {
    if settings.augment_spans <= 0.0 {
        return ds;
    }
    let terms: std::collections::HashSet<&str> =
        derived.terms.iter().map(|(t, _)| t.as_str()).collect();
    let copies = super::augment::substitute_spans(
        &ds.examples,
        super::augment::SpanSubstitution {
            rate: settings.augment_spans,
            seed: settings.seed,
        },
        |k| terms.contains(k),
    );
    tracing::info!(
        "span substitution: {} augmented copies of {} training rows",
        copies.len(),
        ds.examples.len()
    );
    ds.examples.extend(copies);
    ds
}

/// `ds`'s questions as denoising pairs (see [`super::denoise`]).
fn denoising_dataset(mut ds: Dataset, seed: u64) -> Dataset {
    let rows = ds.examples.len();
    ds.examples = super::denoise::denoising_pairs(&ds.examples, seed);
    tracing::info!(
        "denoising objective: {} masked copies of the questions of {} rows of {}",
        ds.examples.len(),
        rows,
        ds.path.display()
    );
    ds
}

/// Reads a data file, reporting the rows skipped with `skip_bad_rows`.
fn read_dataset(path: &Path, skip_bad_rows: bool) -> Result<Dataset> {
    let ds = Dataset::read_tsv(path, skip_bad_rows)?;
    if let Some(s) = ds.skipped_summary() {
        tracing::warn!("{s}");
    }
    Ok(ds)
}

/// The trainer state of a new run over `rows` training rows: the schedule's length and warmup.
fn initial_state(settings: &TrainSettings, rows: usize) -> TrainerState {
    let total_steps = settings
        .max_steps
        .unwrap_or(steps_per_epoch(settings, rows) * settings.max_epochs);
    TrainerState {
        format: TrainerState::FORMAT,
        global_step: 0,
        epoch: 0,
        batches_done: 0,
        total_steps,
        warmup_steps: warmup_steps(total_steps, settings.warmup_ratio),
        best: Vec::new(),
        val_loss: None,
        elapsed_s: 0.0,
    }
}

/// Global batches of `batch_size × workers` rows per epoch over `rows` rows.
fn batches_per_epoch(settings: &TrainSettings, rows: usize) -> usize {
    rows.div_ceil(settings.batch_size * settings.world_size())
}

/// Optimizer steps per epoch over `rows` rows.
fn steps_per_epoch(settings: &TrainSettings, rows: usize) -> usize {
    batches_per_epoch(settings, rows).div_ceil(settings.accumulate_grad_batches)
}

/// The one line that says what the run will do.
fn announce(settings: &TrainSettings, state: &TrainerState, train_rows: usize, val_rows: usize) {
    let world = settings.world_size();
    let workers = match settings.accelerator {
        Accelerator::Cpu if world > 1 => format!(", {world} CPU workers"),
        Accelerator::Cpu => String::new(),
        Accelerator::Gpu => format!(
            ", {world} GPU worker(s) (GPUs {:?} on each of {} node(s))",
            settings.local_devices(),
            settings.num_nodes
        ),
    };
    tracing::info!(
        "{train_rows} training rows, {val_rows} validation rows; {} global batches of {} per epoch, {} optimizer steps ({} warmup){workers}, precision {:?}",
        batches_per_epoch(settings, train_rows),
        settings.batch_size * world,
        state.total_steps,
        state.warmup_steps,
        settings.precision,
    );
}

fn read_checkpoint_settings(dir: &Path) -> Result<TrainSettings> {
    super::checkpoint::check_checkpoint_dir(dir)?;
    let path = dir.join("hparams.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        field: "-".into(),
        message: e.to_string(),
    })?;
    serde_json::from_value(v["settings"].clone()).map_err(|e| Error::Config {
        path,
        field: "settings".into(),
        message: e.to_string(),
    })
}
