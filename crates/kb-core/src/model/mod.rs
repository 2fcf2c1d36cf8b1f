//! The BART network on candle.

mod bart;
pub mod kv_cache;
pub mod layers;
pub mod options;
pub mod packed;
pub mod panel_product;
pub mod quantized;
pub mod step_attention;

pub(crate) use bart::int8_device_error;
pub use bart::{Bart, DecoderCache};
pub use layers::{DropoutRng, Pass};
pub use options::Quantization;
