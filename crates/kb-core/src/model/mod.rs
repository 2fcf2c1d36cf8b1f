//! The BART network on candle.

mod bart;
pub mod kv_cache;
pub mod layers;
pub mod packed;
pub mod quantized;
pub mod step_attention;

pub use bart::{Bart, DecoderCache};
pub use layers::{DropoutRng, Pass};
