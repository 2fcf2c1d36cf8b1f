//! Text generation: settings, score processors, greedy and beam search.

pub mod config;
pub mod processors;
pub mod search;

pub use config::{EarlyStopping, GenerationConfig};
pub use search::{generate, generate_each, generate_each_while, pad_batch, Generated};
