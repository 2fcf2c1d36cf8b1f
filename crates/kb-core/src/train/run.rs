//! What a training run is made of and what its workers share: the invocation's options (and the
//! progress observer the binary renders), the starting point of every replica, and the
//! context and outcome of a worker. A leaf of `train/`: the trainer, the launcher and the
//! workers all import it, it imports none of them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::checkpoint::TrainerState;
use super::optim::{AdamW, AdamWConfig};
use super::settings::TrainSettings;
use super::trainable::Trainable;
use crate::data::Encoded;
use crate::error::{Error, Result};
use crate::generation::GenerationConfig;
use crate::tokenizer::KoTokenizer;

/// What the worker that writes checkpoints reports while it trains; a binary renders it (kb-train
/// draws a progress bar). Called from the training thread: keep it cheap.
pub trait TrainProgress: Send + Sync {
    /// An epoch (0-based, of `epochs`) of `batches` global batches starts, `done` of them already
    /// trained (a resumed run).
    fn epoch_started(&self, epoch: usize, epochs: usize, batches: usize, done: usize);
    /// `done` global batches of the current epoch are trained.
    fn batches_done(&self, done: usize);
    /// An optimizer step ended.
    fn step(&self, step: &StepReport);
    /// The current epoch's batches are over (validation follows).
    fn epoch_finished(&self);
}

/// One optimizer step, as [`TrainProgress::step`] sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Optimizer steps taken in total.
    pub global_step: usize,
    /// Mean training loss over the step's batches.
    pub train_loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Rows per second over the step.
    pub rows_per_s: f64,
    /// Encoder plus decoder tokens per second over the step.
    pub tokens_per_s: f64,
}

/// A request to stop a run early and resumably: set from anywhere (a signal handler, another
/// thread, a [`TrainProgress`] observer), it makes every worker finish its current optimizer
/// step, agree on that step with the others, and end; worker 0 saves `last` there, so `--resume`
/// continues exactly. Clones share one request.
///
/// The workers look at it after each optimizer step (but the schedule's last, which ends the
/// run anyway); with several workers they sum it over the group once per step, so all of them
/// stop after the same step even if they see the request at different moments.
#[derive(Clone, Default)]
pub struct StopRequest(Arc<AtomicUsize>);

impl StopRequest {
    /// The cause [`StopRequest::request`] records.
    pub const ASKED: usize = usize::MAX;

    /// A request nobody has made yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the run to stop; returns whether this is the first request.
    pub fn request(&self) -> bool {
        self.request_because(Self::ASKED)
    }

    /// Asks the run to stop for `cause` (non-zero; kb-train passes the signal's number), unless
    /// a request is already in; returns whether this is the first request. One atomic
    /// compare-and-swap: safe to call from a signal handler.
    pub fn request_because(&self, cause: usize) -> bool {
        assert!(cause != 0, "a stop request's cause is non-zero");
        self.0
            .compare_exchange(0, cause, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Whether a stop has been requested.
    pub fn is_requested(&self) -> bool {
        self.cause().is_some()
    }

    /// The cause of the first request, if any.
    pub fn cause(&self) -> Option<usize> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            c => Some(c),
        }
    }
}

impl std::fmt::Debug for StopRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("StopRequest").field(&self.cause()).finish()
    }
}

/// Options of one invocation that are not part of the recipe.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Continue from this checkpoint folder (its saved settings are used).
    pub resume: Option<PathBuf>,
    /// Stop, saving `last`, after this many optimizer steps of this invocation.
    pub stop_after: Option<usize>,
    /// Told of epochs and steps (nothing is drawn when `None`).
    pub progress: Option<Arc<dyn TrainProgress>>,
    /// Stops the run, saving `last`, after the optimizer step during which it is requested
    /// (kb-train requests it on SIGINT and SIGTERM).
    pub stop: StopRequest,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("resume", &self.resume)
            .field("stop_after", &self.stop_after)
            .field("progress", &self.progress.is_some())
            .field("stop", &self.stop)
            .finish()
    }
}

/// Everything a run starts from, on the CPU; each worker copies it to its device.
pub(crate) struct Setup {
    pub(crate) config: crate::BartConfig,
    pub(crate) tensors: HashMap<String, Tensor>,
    /// Optimizer steps taken and moments (`exp_avg.NAME`, `exp_avg_sq.NAME`), when resuming.
    pub(crate) moments: Option<(usize, HashMap<String, Tensor>)>,
    pub(crate) tokenizer: KoTokenizer,
    pub(crate) config_json: serde_json::Value,
    pub(crate) generation: GenerationConfig,
    pub(crate) state: Option<TrainerState>,
}

impl Setup {
    /// One worker's model and optimizer on `device`, identical on every worker.
    pub(crate) fn replica(
        &self,
        settings: &TrainSettings,
        device: &Device,
    ) -> Result<(Trainable, AdamW)> {
        let setup = self;
        let mut trainable = Trainable::from_tensors(&setup.config, setup.tensors.clone(), device)?;
        trainable.set_compute_dtype(&setup.config, settings.precision.compute_dtype())?;
        let mut optimizer = AdamW::new(
            trainable.parameters(),
            AdamWConfig {
                lr: settings.lr,
                weight_decay: settings.weight_decay,
                ..Default::default()
            },
        )?;
        if let Some((step, moments)) = &setup.moments {
            optimizer.step = *step;
            for p in &mut optimizer.params {
                let get = |k: String| -> Result<Tensor> {
                    let t = moments.get(&k).ok_or_else(|| {
                        Error::Invalid(format!("the checkpoint's optimizer.safetensors lacks {k}"))
                    })?;
                    // A copy of its own: the CPU optimizer updates moments in place, and on the
                    // same device `to_device` would share the buffer with every other worker.
                    Ok(t.to_device(device)?.copy()?)
                };
                p.exp_avg = get(format!("exp_avg.{}", p.name))?;
                p.exp_avg_sq = get(format!("exp_avg_sq.{}", p.name))?;
            }
        }
        Ok((trainable, optimizer))
    }
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
    /// The training labels' derived terms, written into every checkpoint.
    pub(crate) derived_terms: &'a crate::generation::DerivedTerms,
}

/// How one worker's training ended.
pub(crate) struct WorkerOutcome {
    pub(crate) state: TrainerState,
    pub(crate) last_train_loss: Option<f64>,
    pub(crate) interrupted: bool,
    /// Whether the run's [`StopRequest`] ended it.
    pub(crate) stopped: bool,
}
