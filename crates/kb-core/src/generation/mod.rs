//! Text generation: settings, score processors, grounded decoding, greedy and beam search.

pub mod config;
pub mod grounding;
pub mod processors;
pub mod search;

pub use config::{EarlyStopping, GenerationConfig};
pub use grounding::{DerivedTerms, Grounding};
pub use search::{generate, generate_each, generate_each_while, pad_batch, Generated};
