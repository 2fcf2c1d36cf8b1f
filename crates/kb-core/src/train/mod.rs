//! Fine-tuning: trainable model, optimizer and schedule, checkpoints, metrics, the training loop.

pub mod checkpoint;
pub mod metrics;
pub mod optim;
pub mod scratch;
pub mod settings;
pub mod trainable;
pub mod trainer;

pub use optim::{clip_grad_norm, linear_warmup_decay, warmup_steps, AdamW, AdamWConfig};
pub use settings::{Accelerator, InitMode, TrainSettings};
pub use trainable::{masked_cross_entropy, Trainable};
pub use trainer::{train, RunOptions, TrainOutcome};
