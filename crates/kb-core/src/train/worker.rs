//! One data-parallel training worker: a model replica, its optimizer and the loop over its
//! shard of every global batch (the whole batch when there is one worker). Worker 0 also writes
//! checkpoints, metrics and the loss plot, and reports progress.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{Device, Tensor};

use super::checkpoint::{
    checkpoint_name, write_checkpoint, CheckpointData, RankedCheckpoint, TrainerState,
};
use super::collective::Collective;
use super::metrics::{plot_losses, read_metrics, MetricRecord, MetricsLog};
use super::optim::{clip_coefficient, linear_warmup_decay, AdamW};
use super::run::{RunContext, StepReport, TrainProgress, WorkerOutcome};
use super::trainable::Trainable;
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
/// checkpoints, metrics and the loss plot, and reports progress.
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
                derived_terms: ctx.derived_terms,
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
                tracing::info!(
                    "epoch {} step {}/{}: train_loss {:.4}, val_loss {val:.4}",
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
        let progress = self.progress();
        if let Some(p) = progress {
            p.epoch_started(
                epoch,
                settings.max_epochs,
                plan.len(),
                self.state.batches_done,
            );
        }
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
                    if tx
                        .send(Shard::build(data, &global, rank, world, pad))
                        .is_err()
                    {
                        break;
                    }
                }
            });
            // `rx` moves into the consumer so it is dropped on every exit path: an early return
            // (stop_after, an error) then unblocks the producer instead of deadlocking the scope.
            outcome = self.consume(rx, epoch, start_batch, plan.len());
        });
        if let Some(p) = progress {
            p.epoch_finished();
        }
        outcome
    }

    /// The progress observer, on the worker that reports.
    fn progress(&self) -> Option<&'a dyn TrainProgress> {
        let ctx: &'a RunContext<'a> = self.ctx;
        ctx.options.progress.as_deref().filter(|_| self.writes())
    }

    /// Trains on the shards `rx` delivers (batches `start_batch..plan_len` of `epoch`), one
    /// optimizer step per `accumulate_grad_batches` of them; returns whether `stop_after`
    /// interrupted the run mid-epoch.
    fn consume(
        &mut self,
        rx: std::sync::mpsc::Receiver<Result<Shard>>,
        epoch: usize,
        start_batch: usize,
        plan_len: usize,
    ) -> Result<bool> {
        let accumulate = self.ctx.settings.accumulate_grad_batches;
        let mut step = StepAccumulator::new();
        for (offset, shard) in rx.into_iter().enumerate() {
            let batch_index = start_batch + offset;
            self.train_micro_batch(shard?, epoch, batch_index, &mut step)?;
            self.state.batches_done = batch_index + 1;
            if let Some(p) = self.progress() {
                p.batches_done(self.state.batches_done);
            }
            let end_of_step =
                (batch_index + 1).is_multiple_of(accumulate) || self.state.batches_done == plan_len;
            if !end_of_step {
                continue;
            }
            self.optimizer_step(epoch, std::mem::replace(&mut step, StepAccumulator::new()))?;
            if let Some(interrupted) = self.after_step(plan_len)? {
                return Ok(interrupted);
            }
        }
        Ok(false)
    }

    /// Forward and backward pass of this worker's shard of global batch `batch_index`: the
    /// shard's gradients (scaled to its share of the global batch's token-mean loss) are added
    /// to `step`, and the global batch's loss is recorded. A non-finite loss stops the run.
    fn train_micro_batch(
        &mut self,
        shard: Shard,
        epoch: usize,
        batch_index: usize,
        step: &mut StepAccumulator,
    ) -> Result<()> {
        let settings = self.ctx.settings;
        let accumulate = settings.accumulate_grad_batches;
        let micro = batch_index % accumulate;
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
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
                self.ctx.chp.join("last").display()
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
            step.add_gradients(self.trainable.gradients(&scaled)?)?;
        }
        step.losses.push(value);
        step.tokens += shard.global_tokens;
        step.rows += shard.global_rows;
        Ok(())
    }

    /// Sums the gradients over workers, clips them, applies AdamW at the scheduled learning
    /// rate, and records the step (metrics, progress).
    fn optimizer_step(&mut self, epoch: usize, step: StepAccumulator) -> Result<()> {
        let settings = self.ctx.settings;
        let grads = self.all_reduce_gradients(step.grads.unwrap_or_default())?;
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
        let train_loss = step.losses.iter().sum::<f64>() / step.losses.len() as f64;
        self.last_train_loss = Some(train_loss);
        let secs = step.clock.elapsed().as_secs_f64().max(1e-9);
        let tokens_per_s = step.tokens as f64 / secs;
        let time = self.now();
        if let Some(metrics) = &mut self.metrics {
            metrics.write(&MetricRecord {
                step: self.state.global_step,
                epoch,
                train_loss: Some(train_loss),
                val_loss: None,
                lr: Some(lr),
                tokens_per_s: Some(tokens_per_s),
                time,
            })?;
        }
        if let Some(p) = self.progress() {
            p.step(&StepReport {
                global_step: self.state.global_step,
                train_loss,
                lr,
                rows_per_s: step.rows as f64 / secs,
                tokens_per_s,
            });
        }
        Ok(())
    }

    /// What follows an optimizer step: a mid-epoch validation or `last` save when their
    /// interval comes, and the end of the schedule or of `stop_after`. `Some(interrupted)` ends
    /// the epoch's loop (`true`: stopped mid-epoch with `last` saved).
    fn after_step(&mut self, plan_len: usize) -> Result<Option<bool>> {
        let settings = self.ctx.settings;
        let mid_epoch = self.state.batches_done < plan_len;
        let at_end = self.state.global_step >= self.state.total_steps;
        let step = self.state.global_step;
        if let Some(n) = settings.val_check_interval {
            if step.is_multiple_of(n) && mid_epoch && !at_end {
                let here = (self.state.epoch, self.state.batches_done);
                self.evaluate(true, here)?;
            }
        }
        if let Some(n) = settings.save_every_n_steps {
            if step.is_multiple_of(n) && mid_epoch {
                self.state.elapsed_s = self.now();
                self.save("last")?;
            }
        }
        if at_end {
            return Ok(Some(false));
        }
        if self
            .ctx
            .options
            .stop_after
            .is_some_and(|n| self.steps_this_run >= n)
        {
            if mid_epoch {
                self.state.elapsed_s = self.now();
                self.save("last")?;
                return Ok(Some(true));
            }
            return Ok(Some(false)); // the epoch end validates and saves, then stops
        }
        Ok(None)
    }
}

/// What one optimizer step gathers over its micro-batches.
struct StepAccumulator {
    /// Sum of the micro-batches' gradients by parameter name (`None` before the first).
    grads: Option<HashMap<String, Tensor>>,
    /// Each global batch's loss.
    losses: Vec<f64>,
    /// Encoder plus decoder tokens of the global batches.
    tokens: usize,
    /// Rows of the global batches.
    rows: usize,
    /// Started with the step's first micro-batch.
    clock: Instant,
}

impl StepAccumulator {
    fn new() -> Self {
        Self {
            grads: None,
            losses: Vec::new(),
            tokens: 0,
            rows: 0,
            clock: Instant::now(),
        }
    }

    fn add_gradients(&mut self, grads: HashMap<String, Tensor>) -> Result<()> {
        let Some(sum) = &mut self.grads else {
            self.grads = Some(grads);
            return Ok(());
        };
        for (k, g) in grads {
            let total = match sum.remove(&k) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            sum.insert(k, total);
        }
        Ok(())
    }
}

impl Shard {
    /// Worker `rank`'s part of global batch `global` (row indices into `data`).
    fn build(
        data: &[Encoded],
        global: &[usize],
        rank: usize,
        world: usize,
        pad: u32,
    ) -> Result<Self> {
        let mine = &global[shard_range(global.len(), rank, world)];
        let items: Vec<&Encoded> = mine.iter().map(|&i| &data[i]).collect();
        Ok(Shard {
            batch: if items.is_empty() {
                None
            } else {
                Some(Batch::build(&items, pad, &Device::Cpu)?)
            },
            global_label_tokens: global.iter().map(|&i| data[i].label_tokens()).sum(),
            global_tokens: global
                .iter()
                .map(|&i| data[i].input_ids.len() + data[i].decoder_input_ids.len())
                .sum(),
            global_rows: global.len(),
        })
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
