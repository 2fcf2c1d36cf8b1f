//! The model and generation argument groups of kb-extract, kb-eval and kb-serve.

use kb_core::candle_core::DType;
use kb_core::generation::{DerivedTerms, EarlyStopping, GenerationConfig};
use kb_core::{KeywordModel, LoadOptions, Quantization, DEFAULT_MODEL};

use crate::at_least_one;

/// Which model to load, in what dtype, on what device, with what weight quantization and
/// key/value cache dtype.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Model folder (config.json, tokenizer.json, model.safetensors or pytorch_model.bin) or a
    /// Hugging Face hub id resolved through the local cache (HF_HOME) [default:
    /// gogamza/kobart-base-v1, where the tool has one].
    #[arg(long, env = "KB_MODEL", value_name = "DIR_OR_ID")]
    pub model: Option<String>,
    /// Weights dtype: f32, f16 or bf16.
    #[arg(long, env = "KB_DTYPE", default_value = "f32", value_parser = kb_core::parse_dtype)]
    pub dtype: DType,
    /// Device: cpu, cuda or cuda:N (CUDA needs a build with `--features cuda`).
    #[arg(long, env = "KB_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Weight quantization: none, or int8 (CPU only: every linear layer and the token
    /// embedding / LM head as per-row int8 weights with 8-bit activations, a quarter of the
    /// memory; layer norms, softmax and attention stay in floating point).
    #[arg(long, env = "KB_QUANTIZE", default_value = "none", value_parser = parse_quantization)]
    pub quantize: Quantization,
    /// dtype the decoder's key/value caches are stored in: f32, f16 or bf16 (f16/bf16 halve
    /// their memory; attention computes in the model's dtype). Default: the model's dtype.
    #[arg(long = "kv_cache_dtype", alias = "kv-cache-dtype", env = "KB_KV_CACHE_DTYPE",
          value_name = "DTYPE", value_parser = kb_core::parse_dtype)]
    pub kv_cache_dtype: Option<DType>,
}

/// Parses `--quantize`.
fn parse_quantization(s: &str) -> Result<Quantization, String> {
    s.parse()
}

impl ModelArgs {
    /// The model asked for, or [`DEFAULT_MODEL`].
    pub fn spec(&self) -> &str {
        self.model.as_deref().unwrap_or(DEFAULT_MODEL)
    }

    /// How the model is loaded: dtype, quantization and cache dtype.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            dtype: self.dtype,
            quantization: self.quantize,
            kv_cache_dtype: self.kv_cache_dtype,
        }
    }

    /// Loads the model; what loading had to fill in or ignore is logged as a warning.
    pub fn load(&self) -> kb_core::Result<KeywordModel> {
        let device = kb_core::parse_device(&self.device)?;
        let options = self.load_options();
        let model = KeywordModel::load_with(self.spec(), &options, &device)?;
        let note = model.report.summary();
        if !note.is_empty() {
            tracing::warn!("{note}");
        }
        log_storage(&model);
        Ok(model)
    }
}

/// Logs how the model's weights and cache are stored (at debug level unless quantized or the
/// cache is not in the model's dtype).
pub fn log_storage(model: &KeywordModel) {
    let m = &model.model;
    let mib = m.matrix_bytes() as f64 / (1 << 20) as f64;
    let (quantization, cache) = (m.quantization(), m.kv_cache_dtype());
    if quantization != Quantization::None || cache != m.dtype() {
        tracing::info!(
            %quantization,
            kv_cache_dtype = ?cache,
            weight_matrices_mib = format!("{mib:.1}"),
            "model storage"
        );
    } else {
        tracing::debug!(weight_matrices_mib = format!("{mib:.1}"), "model storage");
    }
}

/// Generation settings that override the model folder's (its `generation_config.json`, else
/// `config.json`, else transformers' defaults).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GenerationArgs {
    /// Beam count (1 = greedy). Default: the model folder's generation settings.
    #[arg(long = "num_beams", alias = "num-beams", value_parser = at_least_one())]
    pub num_beams: Option<usize>,
    /// Maximum decoder length, counting the decoder start token.
    #[arg(long = "max_length", alias = "max-length")]
    pub max_length: Option<usize>,
    /// Maximum number of generated tokens (overrides --max_length).
    #[arg(long = "max_new_tokens", alias = "max-new-tokens")]
    pub max_new_tokens: Option<usize>,
    /// Minimum decoder length counting the start token (end-of-sequence is banned before it).
    #[arg(long = "min_length", alias = "min-length")]
    pub min_length: Option<usize>,
    /// Length penalty exponent for beam scores (>1 favours longer outputs).
    #[arg(long = "length_penalty", alias = "length-penalty")]
    pub length_penalty: Option<f64>,
    /// Never repeat an n-gram of this size (0 = off).
    #[arg(long = "no_repeat_ngram_size", alias = "no-repeat-ngram-size")]
    pub no_repeat_ngram_size: Option<usize>,
    /// Beam stopping rule: true (stop when num_beams are finished), false (heuristic), never.
    #[arg(long = "early_stopping", alias = "early-stopping", num_args = 0..=1,
          default_missing_value = "true")]
    pub early_stopping: Option<EarlyStopping>,
    /// Truncate each query to at most this many tokens.
    #[arg(long = "max_input_tokens", alias = "max-input-tokens", value_parser = at_least_one())]
    pub max_input_tokens: Option<usize>,
    /// Grounded decoding: every keyword is a span of the question (whitespace ignored) or a
    /// derived term (--derived_terms, else the model folder's derived_terms.tsv), enforced
    /// inside the search.
    #[arg(long)]
    pub grounded: bool,
    /// Derived terms for --grounded: a `term<TAB>count` TSV such as configs/derived_terms.tsv
    /// (default: the model folder's derived_terms.tsv).
    #[arg(
        long = "derived_terms",
        alias = "derived-terms",
        value_name = "FILE",
        requires = "grounded"
    )]
    pub derived_terms: Option<std::path::PathBuf>,
}

impl GenerationArgs {
    /// `model`'s generation settings with the flags given applied (and the grounding
    /// constraint built for `--grounded`), checked; an error names the flag.
    pub fn for_model(&self, model: &KeywordModel) -> Result<GenerationConfig, String> {
        let mut gen = self.apply(&model.generation)?;
        if self.grounded {
            let terms = self
                .derived_terms
                .as_deref()
                .map(DerivedTerms::read)
                .transpose()
                .map_err(|e| format!("--derived_terms: {e}"))?;
            gen.grounding = Some(
                model
                    .grounding(terms.as_ref())
                    .map_err(|e| format!("--grounded: {e}"))?,
            );
        }
        Ok(gen)
    }

    /// `base` with the flags given applied (all but `--grounded`), checked; an error names the
    /// flag.
    pub fn apply(&self, base: &GenerationConfig) -> Result<GenerationConfig, String> {
        let mut gen = base.clone();
        if let Some(v) = self.num_beams {
            gen.num_beams = v;
        }
        if let Some(v) = self.max_length {
            gen.max_length = v;
            gen.max_new_tokens = None;
        }
        if self.max_new_tokens.is_some() {
            gen.max_new_tokens = self.max_new_tokens;
        }
        if let Some(v) = self.min_length {
            gen.min_length = v;
        }
        if let Some(v) = self.length_penalty {
            gen.length_penalty = v;
        }
        if let Some(v) = self.no_repeat_ngram_size {
            gen.no_repeat_ngram_size = v;
        }
        if let Some(v) = self.early_stopping {
            gen.early_stopping = v;
        }
        gen.validate()
            .map_err(|(field, msg)| format!("--{field}: {msg}"))?;
        Ok(gen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Tool {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        generation: GenerationArgs,
    }

    /// transformers' defaults for a BART with eos 1.
    fn base() -> GenerationConfig {
        GenerationConfig {
            num_beams: 1,
            max_length: 20,
            max_new_tokens: None,
            min_length: 0,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::Heuristic,
            no_repeat_ngram_size: 0,
            forced_eos_token_id: Some(1),
            forced_bos_token_id: None,
            decoder_start_token_id: 1,
            eos_token_ids: vec![1],
            pad_token_id: Some(3),
            grounding: None,
        }
    }

    #[test]
    fn flags_override_the_folder_settings() {
        let t = Tool::try_parse_from([
            "t",
            "--num-beams",
            "3",
            "--max_new_tokens",
            "7",
            "--early_stopping",
            "--dtype",
            "bf16",
        ])
        .unwrap();
        assert_eq!(t.model.spec(), DEFAULT_MODEL);
        assert_eq!(t.model.dtype, DType::BF16);
        let base = base();
        let gen = t.generation.apply(&base).unwrap();
        assert_eq!(gen.num_beams, 3);
        assert_eq!(gen.max_new_tokens, Some(7));
        assert_eq!(gen.early_stopping, EarlyStopping::True);
        assert_eq!(gen.max_length, base.max_length);
    }

    #[test]
    fn quantization_and_cache_flags() {
        let t = Tool::try_parse_from(["t"]).unwrap();
        assert_eq!(t.model.load_options(), LoadOptions::new(DType::F32));
        let t = Tool::try_parse_from([
            "t",
            "--quantize",
            "int8",
            "--kv-cache-dtype",
            "bf16",
            "--dtype",
            "f16",
        ])
        .unwrap();
        let o = t.model.load_options();
        assert_eq!(
            (o.dtype, o.quantization, o.kv_cache_dtype),
            (DType::F16, Quantization::Int8, Some(DType::BF16))
        );
        let t = Tool::try_parse_from(["t", "--kv_cache_dtype", "f16", "--quantize", "none"]);
        assert_eq!(t.unwrap().model.kv_cache_dtype, Some(DType::F16));
        for bad in [["t", "--quantize", "int4"], ["t", "--kv_cache_dtype", "f8"]] {
            let e = Tool::try_parse_from(bad).err().unwrap().to_string();
            assert!(e.contains(bad[1]), "{e}");
        }
    }

    #[test]
    fn bad_values_name_the_flag() {
        assert!(Tool::try_parse_from(["t", "--num_beams", "0"]).is_err());
        assert!(Tool::try_parse_from(["t", "--dtype", "f8"]).is_err());
        let t = Tool::try_parse_from(["t", "--max_length", "1"]).unwrap();
        let e = t.generation.apply(&base()).unwrap_err();
        assert!(e.starts_with("--"), "{e}");
    }
}
