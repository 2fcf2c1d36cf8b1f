//! One data-parallel training worker: a model replica, its optimizer and the loop over its
//! shard of every global batch (the whole batch when there is one worker). Worker 0 also writes
//! checkpoints, metrics, the loss plot and the progress bar.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use super::checkpoint::{
    checkpoint_name, write_checkpoint, CheckpointData, RankedCheckpoint, TrainerState,
};
use super::collective::Collective;
use super::metrics::{plot_losses, read_metrics, MetricRecord, MetricsLog};
use super::optim::{clip_coefficient, linear_warmup_decay, AdamW};
use super::settings::TrainSettings;
use super::trainable::Trainable;
use super::trainer::{RunOptions, Setup};
use crate::data::{epoch_batches, Batch, Encoded};
use crate::error::{Error, Result};
use crate::model::{DropoutRng, Pass};

/// The part of a global batch of `len` rows that worker `rank` of `world` trains on: balanced
/// contiguous slices (the last workers get nothing when there are fewer rows than workers).
pub fn shard_range(len: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let per = len.div_ceil(world.max(1)).max(1);
    let start = (rank * per).min(len);
    start..((rank + 1) * per).min(len)
}

/// What every worker of a run reads.
pub(crate) struct RunContext<'a> {
    pub(crate) settings: &'a TrainSettings,
    pub(crate) options: &'a RunOptions,
    pub(crate) train_data: &'a [Encoded],
    pub(crate) val_data: &'a [Encoded],
    pub(crate) lengths: &'a [usize],
    pub(crate) pad: u32,
    pub(crate) run: &'a Path,
    pub(crate) chp: &'a Path,
    pub(crate) setup: &'a Setup,
    pub(crate) initial_state: TrainerState,
}

/// How one worker's training ended.
pub(crate) struct WorkerOutcome {
    pub(crate) state: TrainerState,
    pub(crate) last_train_loss: Option<f64>,
    pub(crate) interrupted: bool,
}

/// One micro-batch as a worker sees it: its shard and the size of the whole global batch.
struct Shard {
    /// This worker's rows (`None` when the global batch has too few rows to reach it).
    batch: Option<Batch>,
    /// Label tokens of the whole global batch: the loss is their mean.
    global_label_tokens: usize,
    /// Encoder plus decoder tokens of the whole global batch.
    global_tokens: usize,
    /// Rows of the whole global batch.
    global_rows: usize,
}

/// One data-parallel worker: a model replica, its optimizer, and the loop. Worker 0 also writes
/// checkpoints, metrics, the loss plot and the progress bar.
pub(crate) struct Worker<'a, C: Collective> {
    ctx: &'a RunContext<'a>,
    comm: &'a C,
    device: Device,
    trainable: Trainable,
    optimizer: AdamW,
    /// `(name, element count, shape)` of every parameter, in the optimizer's order.
    param_shapes: Vec<(String, candle_core::Shape)>,
    state: TrainerState,
    metrics: Option<MetricsLog>,
    elapsed_before: f64,
    run_clock: Instant,
    last_train_loss: Option<f64>,
    steps_this_run: usize,
}

impl<'a, C: Collective> Worker<'a, C> {
    pub(crate) fn new(
        ctx: &'a RunContext<'a>,
        comm: &'a C,
        device: Device,
        trainable: Trainable,
        optimizer: AdamW,
    ) -> Result<Self> {
        let state = ctx.initial_state.clone();
        let metrics = if comm.rank() == 0 {
            Some(MetricsLog::open(
                ctx.run,
                ctx.options.resume.as_ref().map(|_| state.global_step),
            )?)
        } else {
            None
        };
        let param_shapes = optimizer
            .params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().shape().clone()))
            .collect();
        Ok(Self {
            ctx,
            comm,
            device,
            trainable,
            optimizer,
            param_shapes,
            elapsed_before: state.elapsed_s,
            state,
            metrics,
            run_clock: Instant::now(),
            last_train_loss: None,
            steps_this_run: 0,
        })
    }

    fn writes(&self) -> bool {
        self.comm.rank() == 0
    }

    fn now(&self) -> f64 {
        self.elapsed_before + self.run_clock.elapsed().as_secs_f64()
    }

    fn save(&self, name: &str) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let ctx = self.ctx;
        write_checkpoint(
            &ctx.chp.join(name),
            &CheckpointData {
                tensors: &self.trainable.tensors(),
                optimizer: &self.optimizer,
                state: &self.state,
                settings: ctx.settings,
                config_json: &ctx.setup.config_json,
                generation: &ctx.setup.generation,
                tokenizer: &ctx.setup.tokenizer,
            },
        )
    }

    /// Token-weighted mean loss over the validation data, each worker taking every
    /// `world`-th batch.
    fn validate(&self) -> Result<f64> {
        let data = self.ctx.val_data;
        let mut order: Vec<usize> = (0..data.len()).collect();
        order.sort_by_key(|&i| data[i].input_ids.len() + data[i].labels.len());
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let mut totals = [0.0f64, 0.0];
        for chunk in order
            .chunks(self.ctx.settings.batch_size)
            .skip(rank)
            .step_by(world)
        {
            let items: Vec<&Encoded> = chunk.iter().map(|&i| &data[i]).collect();
            let batch = Batch::build(&items, self.ctx.pad, &self.device)?;
            let (s, n) = self.trainable.loss_sum(&batch)?;
            totals[0] += s;
            totals[1] += n as f64;
        }
        self.comm.all_reduce_f64(&mut totals)?;
        Ok(totals[0] / totals[1].max(1.0))
    }

    /// One validation, top-k bookkeeping and the `last` checkpoint; then the position moves to
    /// `next` (epoch, batches done).
    fn evaluate(&mut self, mid_epoch: bool, next: (usize, usize)) -> Result<f64> {
        let settings = self.ctx.settings;
        let chp = self.ctx.chp;
        let val = self.validate()?;
        if !val.is_finite() {
            return Err(Error::Invalid(format!(
                "non-finite validation loss at step {}; last good checkpoint: {}",
                self.state.global_step,
                chp.join("last").display()
            )));
        }
        self.state.val_loss = Some(val);
        let time = self.now();
        if let Some(metrics) = &mut self.metrics {
            metrics.write(&MetricRecord {
                step: self.state.global_step,
                epoch: self.state.epoch,
                train_loss: None,
                val_loss: Some(val),
                lr: None,
                tokens_per_s: None,
                time,
            })?;
        }
        let state = &mut self.state;
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
                self.save(&name)?;
            }
            if self.writes() {
                for e in evicted.iter().filter(|e| e.name != name) {
                    let p = chp.join(&e.name);
                    if p.exists() {
                        std::fs::remove_dir_all(&p).map_err(|err| Error::io(&p, err))?;
                    }
                }
            }
        }
        self.save("last")?;
        if let Some(metrics) = &self.metrics {
            if let Ok(records) = read_metrics(metrics.path()) {
                let _ = plot_losses(
                    &records,
                    &self.ctx.run.join("loss.svg"),
                    &format!("kb-train: {}", self.ctx.run.display()),
                );
            }
        }
        Ok(val)
    }

    /// Sums every worker's gradients (zeros for those a worker has none of), so that each
    /// replica holds the gradient of the global batch's loss.
    fn all_reduce_gradients(
        &self,
        grads: HashMap<String, Tensor>,
    ) -> Result<HashMap<String, Tensor>> {
        if self.comm.world_size() == 1 {
            return Ok(grads);
        }
        let flat = self
            .param_shapes
            .iter()
            .map(|(name, shape)| match grads.get(name) {
                Some(g) => Ok(g.flatten_all()?),
                None => Ok(Tensor::zeros(
                    shape.elem_count(),
                    candle_core::DType::F32,
                    &self.device,
                )?),
            })
            .collect::<Result<Vec<_>>>()?;
        let summed = self.comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
        let mut out = HashMap::with_capacity(self.param_shapes.len());
        let mut offset = 0;
        for (name, shape) in &self.param_shapes {
            let n = shape.elem_count();
            out.insert(name.clone(), summed.narrow(0, offset, n)?.reshape(shape)?);
            offset += n;
        }
        Ok(out)
    }

    /// Trains until the schedule ends or `stop_after` interrupts it.
    pub(crate) fn run(mut self) -> Result<WorkerOutcome> {
        let settings = self.ctx.settings;
        let mut interrupted = false;
        while self.state.epoch < settings.max_epochs
            && self.state.global_step < self.state.total_steps
        {
            let epoch = self.state.epoch;
            let plan_len = self.global_plan(epoch).len();
            if self.run_epoch(epoch)? {
                interrupted = true;
                break;
            }
            // Epoch end (or schedule end mid-epoch): validate, keep the best, save `last`.
            let finished_epoch = self.state.batches_done >= plan_len;
            let next = if finished_epoch {
                (self.state.epoch + 1, 0)
            } else {
                (self.state.epoch, self.state.batches_done)
            };
            let val = self.evaluate(!finished_epoch, next)?;
            if self.writes() {
                eprintln!(
                    "kb-train: epoch {} step {}/{}: train_loss {:.4}, val_loss {val:.4}",
                    epoch,
                    self.state.global_step,
                    self.state.total_steps,
                    self.last_train_loss.unwrap_or(f64::NAN)
                );
            }
            if self
                .ctx
                .options
                .stop_after
                .is_some_and(|n| self.steps_this_run >= n)
                && self.state.global_step < self.state.total_steps
            {
                interrupted = true;
                break;
            }
        }
        self.state.elapsed_s = self.now();
        Ok(WorkerOutcome {
            state: self.state,
            last_train_loss: self.last_train_loss,
            interrupted,
        })
    }

    /// The global batches of `epoch` (row indices), the same on every worker.
    fn global_plan(&self, epoch: usize) -> Vec<Vec<usize>> {
        let s = self.ctx.settings;
        epoch_batches(
            self.ctx.lengths,
            s.batch_size * self.comm.world_size(),
            s.seed,
            epoch,
            s.bucket,
        )
    }

    /// Trains from the current position to the end of `epoch`; returns whether `stop_after`
    /// interrupted the run mid-epoch (after saving `last`).
    fn run_epoch(&mut self, epoch: usize) -> Result<bool> {
        let ctx = self.ctx;
        let settings = ctx.settings;
        let plan = self.global_plan(epoch);
        let bar = if ctx.options.progress && self.writes() {
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
        bar.set_position(self.state.batches_done as u64);
        let start_batch = self.state.batches_done;
        let todo: Vec<Vec<usize>> = plan[start_batch..].to_vec();
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let (tx, rx) =
            std::sync::mpsc::sync_channel::<Result<Shard>>(settings.num_workers.max(1) * 2);
        let data = ctx.train_data;
        let pad = ctx.pad;
        let mut outcome: Result<bool> = Ok(false);
        std::thread::scope(|scope| {
            scope.spawn(move || {
                for global in todo {
                    let mine = &global[shard_range(global.len(), rank, world)];
                    let shard = (|| {
                        let items: Vec<&Encoded> = mine.iter().map(|&i| &data[i]).collect();
                        Ok(Shard {
                            batch: if items.is_empty() {
                                None
                            } else {
                                Some(Batch::build(&items, pad, &Device::Cpu)?)
                            },
                            global_label_tokens: global
                                .iter()
                                .map(|&i| data[i].label_tokens())
                                .sum(),
                            global_tokens: global
                                .iter()
                                .map(|&i| data[i].input_ids.len() + data[i].decoder_input_ids.len())
                                .sum(),
                            global_rows: global.len(),
                        })
                    })();
                    if tx.send(shard).is_err() {
                        break;
                    }
                }
            });
            // `rx` moves into the consumer so it is dropped on every exit path: an early return
            // (stop_after, an error) then unblocks the producer instead of deadlocking the scope.
            outcome = self.consume(rx, epoch, start_batch, plan.len(), &bar);
        });
        bar.finish_and_clear();
        outcome
    }

    fn consume(
        &mut self,
        rx: std::sync::mpsc::Receiver<Result<Shard>>,
        epoch: usize,
        start_batch: usize,
        plan_len: usize,
        bar: &ProgressBar,
    ) -> Result<bool> {
        let ctx = self.ctx;
        let settings = ctx.settings;
        let accumulate = settings.accumulate_grad_batches;
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let mut acc: Option<HashMap<String, Tensor>> = None;
        let mut group_losses = Vec::new();
        let mut group_tokens = 0usize;
        let mut group_rows = 0usize;
        let mut group_clock = Instant::now();
        for (offset, shard) in rx.into_iter().enumerate() {
            let shard = shard?;
            let batch_index = start_batch + offset;
            let micro = batch_index % accumulate;
            let mut local = [0.0f64];
            let mut shard_loss = None;
            if let Some(batch) = shard.batch {
                let batch = if self.device.is_cpu() {
                    batch
                } else {
                    to_device(batch, &self.device)?
                };
                let rng = DropoutRng::new(
                    settings.seed
                        ^ ((self.state.global_step as u64) << 20)
                        ^ micro as u64
                        ^ ((rank as u64) << 40),
                );
                let loss = self.trainable.loss(
                    &batch,
                    Pass::Training {
                        dropout: Some(&rng),
                    },
                )?;
                let mean = loss.to_scalar::<f32>()? as f64;
                local[0] = mean * batch.label_tokens as f64;
                // This shard's share of the global batch's token-mean loss.
                let share = batch.label_tokens as f64 / shard.global_label_tokens as f64;
                shard_loss = Some((loss, share, mean));
            }
            let value = if world == 1 {
                shard_loss.as_ref().map(|s| s.2).unwrap_or(f64::NAN)
            } else {
                self.comm.all_reduce_f64(&mut local)?;
                local[0] / shard.global_label_tokens.max(1) as f64
            };
            if !value.is_finite() {
                return Err(Error::Invalid(format!(
                    "non-finite training loss ({value}) at step {} (epoch {}, batch {batch_index}); stopping. The last good checkpoint is {}",
                    self.state.global_step + 1,
                    epoch,
                    ctx.chp.join("last").display()
                )));
            }
            if let Some((loss, share, _)) = shard_loss {
                let mut scaled = loss;
                if share != 1.0 {
                    scaled = (scaled * share)?;
                }
                if accumulate != 1 {
                    scaled = (scaled / accumulate as f64)?;
                }
                let grads = self.trainable.gradients(&scaled)?;
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
            }
            group_losses.push(value);
            group_tokens += shard.global_tokens;
            group_rows += shard.global_rows;
            self.state.batches_done = batch_index + 1;
            bar.set_position(self.state.batches_done as u64);
            let end_of_group = micro + 1 == accumulate || self.state.batches_done == plan_len;
            if !end_of_group {
                continue;
            }
            let grads = self.all_reduce_gradients(acc.take().unwrap_or_default())?;
            let grad_scale = if settings.gradient_clip_val > 0.0 {
                clip_coefficient(&grads, settings.gradient_clip_val)?.0
            } else {
                1.0
            };
            let lr = settings.lr
                * linear_warmup_decay(
                    self.state.global_step,
                    self.state.warmup_steps,
                    self.state.total_steps,
                );
            self.optimizer.step_scaled(&grads, lr, grad_scale)?;
            self.trainable.sync_compute_copy()?;
            self.state.global_step += 1;
            self.steps_this_run += 1;
            let train_loss = group_losses.iter().sum::<f64>() / group_losses.len() as f64;
            self.last_train_loss = Some(train_loss);
            let secs = group_clock.elapsed().as_secs_f64().max(1e-9);
            let tps = group_tokens as f64 / secs;
            let time = self.now();
            if let Some(metrics) = &mut self.metrics {
                metrics.write(&MetricRecord {
                    step: self.state.global_step,
                    epoch,
                    train_loss: Some(train_loss),
                    val_loss: None,
                    lr: Some(lr),
                    tokens_per_s: Some(tps),
                    time,
                })?;
            }
            bar.set_message(format!(
                "loss {train_loss:.4}  lr {lr:.2e}  {:.1} rows/s  {tps:.0} tok/s",
                group_rows as f64 / secs
            ));
            group_losses.clear();
            group_tokens = 0;
            group_rows = 0;
            group_clock = Instant::now();

            let at_end = self.state.global_step >= self.state.total_steps;
            if let Some(n) = settings.val_check_interval {
                if self.state.global_step.is_multiple_of(n)
                    && self.state.batches_done < plan_len
                    && !at_end
                {
                    let here = (self.state.epoch, self.state.batches_done);
                    self.evaluate(true, here)?;
                }
            }
            if let Some(n) = settings.save_every_n_steps {
                if self.state.global_step.is_multiple_of(n) && self.state.batches_done < plan_len {
                    self.state.elapsed_s = self.now();
                    self.save("last")?;
                }
            }
            if at_end {
                return Ok(false);
            }
            if ctx
                .options
                .stop_after
                .is_some_and(|n| self.steps_this_run >= n)
            {
                if self.state.batches_done < plan_len {
                    self.state.elapsed_s = self.now();
                    self.save("last")?;
                    return Ok(true);
                }
                return Ok(false); // the epoch end validates and saves, then stops
            }
        }
        Ok(false)
    }
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

#[cfg(test)]
mod tests {
    use super::shard_range;

    #[test]
    fn shards_cover_a_global_batch_once_in_order() {
        for len in 0..20 {
            for world in 1..5 {
                let parts: Vec<_> = (0..world).map(|r| shard_range(len, r, world)).collect();
                let covered: Vec<usize> = parts.iter().flat_map(|r| r.clone()).collect();
                assert_eq!(covered, (0..len).collect::<Vec<_>>(), "{len} rows, {world}");
                let sizes: Vec<usize> = parts.iter().map(|r| r.len()).collect();
                assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
            }
        }
        assert_eq!(shard_range(8, 1, 2), 4..8);
        assert_eq!(shard_range(1, 2, 3), 1..1);
    }
}
