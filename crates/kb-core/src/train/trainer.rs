//! The training loop: the original Lightning recipe (AdamW, linear warmup, clipping, gradient
//! accumulation, validation each epoch, top-k checkpoints by val_loss) with exact resume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use super::checkpoint::{
    checkpoint_name, find_last, read_checkpoint, write_checkpoint, CheckpointData,
    RankedCheckpoint, TrainerState,
};
use super::metrics::{plot_losses, read_metrics, MetricRecord, MetricsLog};
use super::optim::{clip_grad_norm, linear_warmup_decay, warmup_steps, AdamW, AdamWConfig};
use super::scratch::{scratch_config, train_tokenizer};
use super::settings::{Accelerator, InitMode, TrainSettings};
use super::trainable::Trainable;
use crate::data::{encode_examples, epoch_batches, Batch, Dataset, Encoded};
use crate::error::{Error, Result};
use crate::generation::{EarlyStopping, GenerationConfig};
use crate::model::{DropoutRng, Pass};
use crate::source::ModelSource;
use crate::tokenizer::KoTokenizer;
use crate::weights::{load_checked, WeightFiles};

/// Options of one invocation that are not part of the recipe.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Continue from this checkpoint folder (its saved settings are used).
    pub resume: Option<PathBuf>,
    /// Stop, saving `last`, after this many optimizer steps of this invocation.
    pub stop_after: Option<usize>,
    /// Draw progress bars on the terminal.
    pub progress: bool,
}

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
    /// Whether `stop_after` ended the run before its schedule.
    pub interrupted: bool,
    /// Training seconds (resumed runs included).
    pub elapsed_s: f64,
    /// Run folder.
    pub run_dir: PathBuf,
}

/// The generation defaults shipped with trained models: the original server's beam 5, ending at
/// the model's eos, within the model's positions.
pub fn serving_generation_config(cfg: &crate::BartConfig) -> GenerationConfig {
    let mut g = GenerationConfig::from_model_config(cfg).expect("config already validated");
    g.num_beams = 5;
    g.max_length = 512.min(cfg.max_position_embeddings);
    g.early_stopping = EarlyStopping::Heuristic;
    g.forced_eos_token_id = cfg.forced_eos_token_id.or(Some(g.eos_token_ids[0]));
    g
}

fn device_for(settings: &TrainSettings) -> Result<Device> {
    match settings.accelerator {
        Accelerator::Cpu => Ok(Device::Cpu),
        Accelerator::Gpu => {
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::Invalid(
                    "--accelerator gpu needs a build with CUDA: rebuild with `cargo build --release --features cuda` (CUDA toolkit and CUDA_COMPUTE_CAP set; see README)".into(),
                ));
            }
            if settings.num_gpus > 1 {
                return Err(Error::Invalid(format!(
                    "--num_gpus {} (data-parallel training) is not available in this version; use --num_gpus 1",
                    settings.num_gpus
                )));
            }
            Ok(Device::new_cuda(0)?)
        }
    }
}

struct Setup {
    trainable: Trainable,
    optimizer: AdamW,
    tokenizer: KoTokenizer,
    config_json: serde_json::Value,
    generation: GenerationConfig,
    state: Option<TrainerState>,
}

fn fresh_setup(settings: &TrainSettings, train: &Dataset, device: &Device) -> Result<Setup> {
    let (trainable, tokenizer, config_json, generation) = match settings.init {
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
                device,
            )?;
            let note = report.summary();
            if !note.is_empty() {
                eprintln!("kb-train: {note}");
            }
            let trainable = Trainable::from_tensors(&cfg, tensors, device)?;
            let generation = serving_generation_config(&cfg);
            (trainable, tokenizer, config_json, generation)
        }
        InitMode::Scratch => {
            let path = settings.model_config.as_ref().expect("validated");
            let tok = train_tokenizer(&train.examples, settings.tokenizer_vocab_size)?;
            let (cfg, config_json) = scratch_config(path, tok.get_vocab_size(true))?;
            let tokenizer = KoTokenizer::new(tok, &cfg, path)?;
            let trainable = Trainable::from_scratch(&cfg, settings.seed, device)?;
            let generation = serving_generation_config(&cfg);
            (trainable, tokenizer, config_json, generation)
        }
    };
    let optimizer = AdamW::new(
        trainable.parameters(),
        AdamWConfig {
            lr: settings.lr,
            weight_decay: settings.weight_decay,
            ..Default::default()
        },
    )?;
    Ok(Setup {
        trainable,
        optimizer,
        tokenizer,
        config_json,
        generation,
        state: None,
    })
}

fn resumed_setup(dir: &Path, device: &Device) -> Result<(Setup, TrainSettings)> {
    let ck = read_checkpoint(dir, device)?;
    let trainable = Trainable::from_tensors(&ck.config, ck.tensors, device)?;
    let mut optimizer = AdamW::new(
        trainable.parameters(),
        AdamWConfig {
            lr: ck.settings.lr,
            weight_decay: ck.settings.weight_decay,
            ..Default::default()
        },
    )?;
    optimizer.step = ck.optimizer_step;
    for p in &mut optimizer.params {
        let get = |k: String| {
            ck.moments.get(&k).cloned().ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: optimizer.safetensors lacks {k}",
                    dir.display()
                ))
            })
        };
        p.exp_avg = get(format!("exp_avg.{}", p.name))?;
        p.exp_avg_sq = get(format!("exp_avg_sq.{}", p.name))?;
    }
    Ok((
        Setup {
            trainable,
            optimizer,
            tokenizer: ck.tokenizer,
            config_json: ck.config_json,
            generation: ck.generation,
            state: Some(ck.state),
        },
        ck.settings,
    ))
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

/// Token-weighted mean loss over `data`.
fn validate(
    trainable: &Trainable,
    data: &[Encoded],
    batch_size: usize,
    pad: u32,
    device: &Device,
) -> Result<f64> {
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.sort_by_key(|&i| data[i].input_ids.len() + data[i].labels.len());
    let (mut sum, mut tokens) = (0.0, 0usize);
    for chunk in order.chunks(batch_size) {
        let items: Vec<&Encoded> = chunk.iter().map(|&i| &data[i]).collect();
        let batch = Batch::build(&items, pad, device)?;
        let (s, n) = trainable.loss_sum(&batch)?;
        sum += s;
        tokens += n;
    }
    Ok(sum / tokens.max(1) as f64)
}

/// Runs (or resumes) training as `settings` describe.
pub fn train(settings: &TrainSettings, options: &RunOptions) -> Result<TrainOutcome> {
    let (resumed, settings) = match &options.resume {
        Some(path) => {
            let dir = resolve_resume(path)?;
            let mut saved = read_checkpoint_settings(&dir)?;
            saved.num_workers = settings.num_workers;
            let device = device_for(&saved)?;
            eprintln!(
                "kb-train: resuming from {} with its saved settings",
                dir.display()
            );
            let (setup, _) = resumed_setup(&dir, &device)?;
            (Some(setup), saved)
        }
        None => {
            settings
                .validate()
                .map_err(|(f, m)| Error::Invalid(format!("--{f}: {m}")))?;
            (None, settings.clone())
        }
    };
    let device = device_for(&settings)?;
    let train_ds = Dataset::read_tsv(&settings.train_file, settings.skip_bad_rows)?;
    let val_ds = Dataset::read_tsv(&settings.test_file, settings.skip_bad_rows)?;
    for ds in [&train_ds, &val_ds] {
        if let Some(s) = ds.skipped_summary() {
            eprintln!("kb-train: {s}");
        }
    }
    let setup = match resumed {
        Some(setup) => setup,
        None => fresh_setup(&settings, &train_ds, &device)?,
    };
    let Setup {
        trainable,
        mut optimizer,
        tokenizer,
        config_json,
        generation,
        state,
    } = setup;
    let train_data = encode_with_workers(
        &tokenizer,
        &train_ds,
        settings.max_len,
        settings.num_workers,
    )?;
    let val_data =
        encode_with_workers(&tokenizer, &val_ds, settings.max_len, settings.num_workers)?;
    let pad = tokenizer.special().pad;
    let lengths: Vec<usize> = train_data
        .iter()
        .map(|e| e.input_ids.len() + e.labels.len())
        .collect();
    let batches_per_epoch = train_data.len().div_ceil(settings.batch_size);
    let steps_per_epoch = batches_per_epoch.div_ceil(settings.accumulate_grad_batches);
    let total_steps = settings
        .max_steps
        .unwrap_or(steps_per_epoch * settings.max_epochs);
    let mut state = state.unwrap_or(TrainerState {
        format: TrainerState::FORMAT,
        global_step: 0,
        epoch: 0,
        batches_done: 0,
        total_steps,
        warmup_steps: warmup_steps(total_steps, settings.warmup_ratio),
        best: Vec::new(),
        val_loss: None,
        elapsed_s: 0.0,
    });
    let run = settings.checkpoint.clone();
    let chp = run.join("model_chp");
    std::fs::create_dir_all(&chp).map_err(|e| Error::io(&chp, e))?;
    let mut metrics = MetricsLog::open(&run, options.resume.as_ref().map(|_| state.global_step))?;
    let elapsed_before = state.elapsed_s;
    let run_clock = Instant::now();
    let mut last_train_loss = None;
    let mut steps_this_run = 0usize;
    let mut interrupted = false;

    eprintln!(
        "kb-train: {} training rows, {} validation rows; {} batches of {} per epoch, {} optimizer steps ({} warmup), device {:?}",
        train_data.len(),
        val_data.len(),
        batches_per_epoch,
        settings.batch_size,
        state.total_steps,
        state.warmup_steps,
        device
    );

    let save = |name: &str,
                trainable: &Trainable,
                optimizer: &AdamW,
                state: &TrainerState|
     -> Result<()> {
        write_checkpoint(
            &chp.join(name),
            &CheckpointData {
                tensors: &trainable.tensors(),
                optimizer,
                state,
                settings: &settings,
                config_json: &config_json,
                generation: &generation,
                tokenizer: &tokenizer,
            },
        )
    };

    // One validation, top-k bookkeeping and `last` checkpoint.
    let evaluate = |trainable: &Trainable,
                    optimizer: &AdamW,
                    state: &mut TrainerState,
                    metrics: &mut MetricsLog,
                    mid_epoch: bool,
                    next: (usize, usize)|
     -> Result<f64> {
        let val = validate(trainable, &val_data, settings.batch_size, pad, &device)?;
        if !val.is_finite() {
            return Err(Error::Invalid(format!(
                "non-finite validation loss at step {}; last good checkpoint: {}",
                state.global_step,
                chp.join("last").display()
            )));
        }
        state.val_loss = Some(val);
        let time = elapsed_before + run_clock.elapsed().as_secs_f64();
        metrics.write(&MetricRecord {
            step: state.global_step,
            epoch: state.epoch,
            train_loss: None,
            val_loss: Some(val),
            lr: None,
            tokens_per_s: None,
            time,
        })?;
        let name = checkpoint_name(state.epoch, val, mid_epoch.then_some(state.global_step));
        let qualifies = state.best.len() < settings.save_top_k
            || state.best.last().map(|w| val < w.val_loss).unwrap_or(true);
        (state.epoch, state.batches_done) = next;
        state.elapsed_s = time;
        if qualifies {
            state.best.push(RankedCheckpoint {
                name: name.clone(),
                val_loss: val,
            });
            state.best.sort_by(|a, b| a.val_loss.total_cmp(&b.val_loss));
            let evicted: Vec<RankedCheckpoint> = state
                .best
                .drain(settings.save_top_k.min(state.best.len())..)
                .collect();
            if !evicted.iter().any(|e| e.name == name) {
                save(&name, trainable, optimizer, state)?;
            }
            for e in evicted.iter().filter(|e| e.name != name) {
                let p = chp.join(&e.name);
                if p.exists() {
                    std::fs::remove_dir_all(&p).map_err(|err| Error::io(&p, err))?;
                }
            }
        }
        save("last", trainable, optimizer, state)?;
        if let Ok(records) = read_metrics(metrics.path()) {
            let _ = plot_losses(
                &records,
                &run.join("loss.svg"),
                &format!("kb-train: {}", run.display()),
            );
        }
        Ok(val)
    };

    'epochs: while state.epoch < settings.max_epochs && state.global_step < state.total_steps {
        let epoch = state.epoch;
        let plan = epoch_batches(
            &lengths,
            settings.batch_size,
            settings.seed,
            epoch,
            settings.bucket,
        );
        let bar = if options.progress {
            ProgressBar::new(plan.len() as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} {bar:30} {pos}/{len} batches  {msg}  eta {eta}",
            )
            .expect("valid template"),
        );
        bar.set_prefix(format!("{}/{}", epoch + 1, settings.max_epochs));
        bar.set_position(state.batches_done as u64);
        let start_batch = state.batches_done;
        let todo: Vec<Vec<usize>> = plan[start_batch..].to_vec();
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<Result<Batch>>(settings.num_workers.max(1) * 2);
        let data_ref = &train_data;
        let mut outcome: Result<bool> = Ok(false);
        std::thread::scope(|scope| {
            scope.spawn(move || {
                for idx in todo {
                    let items: Vec<&Encoded> = idx.iter().map(|&i| &data_ref[i]).collect();
                    if tx.send(Batch::build(&items, pad, &Device::Cpu)).is_err() {
                        break;
                    }
                }
            });
            // `rx` moves into the consumer so it is dropped on every exit path: an early return
            // (stop_after, an error) then unblocks the producer instead of deadlocking the scope.
            outcome = (|rx: std::sync::mpsc::Receiver<Result<Batch>>| -> Result<bool> {
                let mut acc: Option<HashMap<String, Tensor>> = None;
                let mut group_losses = Vec::new();
                let mut group_tokens = 0usize;
                let mut group_clock = Instant::now();
                for (offset, batch) in rx.into_iter().enumerate() {
                    let batch = batch?;
                    let batch_index = start_batch + offset;
                    let batch = if device.is_cpu() {
                        batch
                    } else {
                        to_device(batch, &device)?
                    };
                    let micro = batch_index % settings.accumulate_grad_batches;
                    let rng = DropoutRng::new(
                        settings.seed ^ ((state.global_step as u64) << 20) ^ micro as u64,
                    );
                    let loss = trainable.loss(
                        &batch,
                        Pass::Training {
                            dropout: Some(&rng),
                        },
                    )?;
                    let value = loss.to_scalar::<f32>()? as f64;
                    if !value.is_finite() {
                        return Err(Error::Invalid(format!(
                            "non-finite training loss ({value}) at step {} (epoch {}, batch {batch_index}); stopping. The last good checkpoint is {}",
                            state.global_step + 1,
                            epoch,
                            chp.join("last").display()
                        )));
                    }
                    let scaled = (loss / settings.accumulate_grad_batches as f64)?;
                    let grads = trainable.gradients(&scaled)?;
                    acc = Some(match acc.take() {
                        None => grads,
                        Some(mut a) => {
                            for (k, g) in grads {
                                let sum = match a.remove(&k) {
                                    Some(prev) => (prev + g)?,
                                    None => g,
                                };
                                a.insert(k, sum);
                            }
                            a
                        }
                    });
                    group_losses.push(value);
                    group_tokens += batch.tokens;
                    state.batches_done = batch_index + 1;
                    bar.set_position(state.batches_done as u64);
                    let end_of_group = micro + 1 == settings.accumulate_grad_batches
                        || state.batches_done == plan.len();
                    if !end_of_group {
                        continue;
                    }
                    let mut grads = acc.take().unwrap_or_default();
                    if settings.gradient_clip_val > 0.0 {
                        clip_grad_norm(&mut grads, settings.gradient_clip_val)?;
                    }
                    let lr = settings.lr
                        * linear_warmup_decay(
                            state.global_step,
                            state.warmup_steps,
                            state.total_steps,
                        );
                    optimizer.step(&grads, lr)?;
                    state.global_step += 1;
                    steps_this_run += 1;
                    let train_loss = group_losses.iter().sum::<f64>() / group_losses.len() as f64;
                    last_train_loss = Some(train_loss);
                    let secs = group_clock.elapsed().as_secs_f64().max(1e-9);
                    let tps = group_tokens as f64 / secs;
                    let time = elapsed_before + run_clock.elapsed().as_secs_f64();
                    metrics.write(&MetricRecord {
                        step: state.global_step,
                        epoch,
                        train_loss: Some(train_loss),
                        val_loss: None,
                        lr: Some(lr),
                        tokens_per_s: Some(tps),
                        time,
                    })?;
                    bar.set_message(format!(
                        "loss {train_loss:.4}  lr {lr:.2e}  {:.1} rows/s  {tps:.0} tok/s",
                        (group_losses.len() * settings.batch_size) as f64 / secs
                    ));
                    group_losses.clear();
                    group_tokens = 0;
                    group_clock = Instant::now();

                    let at_end = state.global_step >= state.total_steps;
                    if let Some(n) = settings.val_check_interval {
                        if state.global_step % n == 0 && state.batches_done < plan.len() && !at_end
                        {
                            let here = (state.epoch, state.batches_done);
                            evaluate(&trainable, &optimizer, &mut state, &mut metrics, true, here)?;
                        }
                    }
                    if let Some(n) = settings.save_every_n_steps {
                        if state.global_step % n == 0 && state.batches_done < plan.len() {
                            state.elapsed_s = elapsed_before + run_clock.elapsed().as_secs_f64();
                            save("last", &trainable, &optimizer, &state)?;
                        }
                    }
                    if at_end {
                        return Ok(false);
                    }
                    if options.stop_after.is_some_and(|n| steps_this_run >= n) {
                        if state.batches_done < plan.len() {
                            state.elapsed_s = elapsed_before + run_clock.elapsed().as_secs_f64();
                            save("last", &trainable, &optimizer, &state)?;
                            return Ok(true);
                        }
                        return Ok(false); // the epoch end below validates and saves, then stops
                    }
                }
                Ok(false)
            })(rx);
        });
        bar.finish_and_clear();
        if outcome? {
            interrupted = true;
            break 'epochs;
        }
        // Epoch end (or schedule end mid-epoch): validate, keep the best, save `last`.
        let finished_epoch = state.batches_done >= plan.len();
        let next = if finished_epoch {
            (state.epoch + 1, 0)
        } else {
            (state.epoch, state.batches_done)
        };
        let val = evaluate(
            &trainable,
            &optimizer,
            &mut state,
            &mut metrics,
            !finished_epoch,
            next,
        )?;
        eprintln!(
            "kb-train: epoch {} step {}/{}: train_loss {:.4}, val_loss {val:.4}",
            epoch,
            state.global_step,
            state.total_steps,
            last_train_loss.unwrap_or(f64::NAN)
        );
        if options.stop_after.is_some_and(|n| steps_this_run >= n)
            && state.global_step < state.total_steps
        {
            interrupted = true;
            break;
        }
    }
    Ok(TrainOutcome {
        global_step: state.global_step,
        total_steps: state.total_steps,
        best: state.best.clone(),
        val_loss: state.val_loss,
        last_train_loss,
        interrupted,
        elapsed_s: elapsed_before + run_clock.elapsed().as_secs_f64(),
        run_dir: run,
    })
}

fn to_device(b: Batch, device: &Device) -> Result<Batch> {
    Ok(Batch {
        input_ids: b.input_ids.to_device(device)?,
        attention_mask: b.attention_mask.to_device(device)?,
        decoder_input_ids: b.decoder_input_ids.to_device(device)?,
        decoder_attention_mask: b.decoder_attention_mask.to_device(device)?,
        labels: b.labels.to_device(device)?,
        ..b
    })
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
