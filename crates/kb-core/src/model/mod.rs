//! The BART network on candle.

mod bart;
pub mod cpu_linear;
pub mod kv_cache;
pub mod layers;
pub mod step_attention;

pub use bart::{Bart, DecoderCache};
pub use layers::{DropoutRng, Pass};
