//! Fine-tuning: trainable model, optimizer and schedule, checkpoints, metrics, the training loop.

pub mod augment;
pub mod checkpoint;
pub mod collective;
pub mod denoise;
mod launch;
pub mod metrics;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod optim;
pub mod rendezvous;
mod run;
pub mod scratch;
pub mod settings;
pub mod trainable;
pub mod trainer;
mod worker;

pub use collective::{Collective, InProcessGroup, SingleWorker};
pub use optim::{
    clip_coefficient, clip_grad_norm, linear_warmup_decay, warmup_steps, AdamW, AdamWConfig,
};
pub use run::{RunOptions, StepReport, StopRequest, TrainProgress};
pub use settings::{Accelerator, InitMode, Objective, Precision, TrainSettings};
pub use trainable::{masked_cross_entropy, Trainable};
pub use trainer::{derived_terms_of, train, TrainOutcome, DERIVED_TERM_MIN_COUNT};
