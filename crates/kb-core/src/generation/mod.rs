//! Text generation: settings, score processors, greedy and beam search.

pub mod config;
pub mod processors;
pub mod search;

pub use config::{EarlyStopping, GenerationConfig};
pub use search::{generate, pad_batch, Generated};
