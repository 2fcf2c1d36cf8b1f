//! # kb-core
//!
//! The library behind kobart-keywords: a KoBART (BART) model on candle that computes what
//! Hugging Face transformers' `BartForConditionalGeneration` computes, its weights and tokenizer
//! loading, generation equal to transformers' `generate()`, and keyword post-processing.
//!
//! ```no_run
//! use kb_core::{KeywordModel, candle_core::{DType, Device}};
//! let m = KeywordModel::load("gogamza/kobart-base-v1", DType::F32, &Device::Cpu)?;
//! let mut gen = m.generation.clone();
//! gen.num_beams = 5;
//! let out = m.extract(&["이사화물 통관예약을 하면 뭐가 좋나요?"], &gen, None)?;
//! println!("{}", out[0].keywords.join(", "));
//! # Ok::<(), kb_core::Error>(())
//! ```

#![warn(missing_docs)]

pub mod allocator;
pub mod config;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
#[cfg(feature = "train")]
pub mod export;
pub mod generation;
pub mod keywords;
pub mod model;
pub mod pipeline;
pub mod source;
pub mod synonyms;
pub mod threads;
pub mod tokenizer;
#[cfg(feature = "train")]
pub mod train;
pub mod tsv;
pub mod vector_math;
pub mod weights;

#[cfg(test)]
pub(crate) mod test_support;

pub use candle_core;
pub use candle_nn;
pub use config::BartConfig;
pub use device::{parse_device, parse_dtype};
pub use error::{Error, Result};
pub use generation::{generate, generate_each, generate_each_while, Generated, GenerationConfig};
pub use model::{Bart, Quantization};
pub use pipeline::{Extraction, KeywordModel, LoadOptions};
pub use source::{ModelSource, DEFAULT_MODEL};
pub use tokenizer::KoTokenizer;
