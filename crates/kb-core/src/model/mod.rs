//! The BART network on candle.

mod bart;
pub mod layers;

pub use bart::{Bart, DecoderCache};
pub use layers::{DropoutRng, Pass};
