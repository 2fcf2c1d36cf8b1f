//! Fine-tuning: trainable model, optimizer and schedule, checkpoints, metrics, the training loop.

pub mod optim;
pub mod trainable;

pub use optim::{clip_grad_norm, linear_warmup_decay, warmup_steps, AdamW, AdamWConfig};
pub use trainable::{masked_cross_entropy, Trainable};
