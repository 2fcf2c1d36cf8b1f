//! A loaded keyword model — config, tokenizer, weights, generation defaults — and the batched
//! query → keywords path every binary uses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use crate::config::BartConfig;
use crate::error::{Error, Result};
use crate::generation::{generate, DerivedTerms, GenerationConfig, Grounding};
use crate::keywords::split_keywords;
use crate::model::{Bart, Quantization};
use crate::source::ModelSource;
use crate::tokenizer::KoTokenizer;
use crate::weights::{LazyWeights, LoadReport, WeightFiles};

/// The file of a model folder that lists its derived terms (see [`DerivedTerms`]).
pub const DERIVED_TERMS_FILE: &str = "derived_terms.tsv";

/// One query's result.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Extraction {
    /// The query as given.
    pub query: String,
    /// Keywords in the model's order, deduplicated.
    pub keywords: Vec<String>,
    /// The generated text (special tokens skipped).
    pub text: String,
    /// Generated token ids, without the decoder start token.
    pub ids: Vec<u32>,
    /// Beam search's length-normalised log-probability (`None` for greedy decoding).
    pub score: Option<f32>,
}

/// How a model is loaded for inference: [`KeywordModel::load_with`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// The dtype the weights are loaded in and the network computes in (the checkpoint's own
    /// dtype is converted).
    pub dtype: DType,
    /// How the weight matrices are stored ([`Quantization::Int8`]: CPU only, quantized from the
    /// loaded values).
    pub quantization: Quantization,
    /// The dtype of the decoder's key/value caches (f32, f16 or bf16); `None`: `dtype`.
    pub kv_cache_dtype: Option<DType>,
}

impl Default for LoadOptions {
    /// f32, no quantization, the cache in f32.
    fn default() -> Self {
        Self::new(DType::F32)
    }
}

impl LoadOptions {
    /// `dtype`, no quantization, the cache in `dtype`: what [`KeywordModel::load`] does.
    pub fn new(dtype: DType) -> Self {
        Self {
            dtype,
            quantization: Quantization::None,
            kv_cache_dtype: None,
        }
    }

    /// Checks that the options can run on `device`: int8 runs on the CPU only, and a cache
    /// holds f32, f16 or bf16.
    pub fn check(&self, device: &Device) -> Result<()> {
        if self.quantization == Quantization::Int8 && !device.is_cpu() {
            return Err(crate::model::int8_device_error(device));
        }
        if let Some(dtype) = self.kv_cache_dtype {
            if !crate::model::options::is_cache_dtype(dtype) {
                return Err(Error::Invalid(format!(
                    "a key/value cache cannot be stored in {dtype:?} (use f32, f16 or bf16)"
                )));
            }
        }
        Ok(())
    }
}

/// A model ready to extract keywords.
#[derive(Debug, Clone)]
pub struct KeywordModel {
    /// Network hyper-parameters.
    pub config: BartConfig,
    /// Generation defaults from the folder.
    pub generation: GenerationConfig,
    /// Tokenizer.
    pub tokenizer: KoTokenizer,
    /// The network.
    pub model: Bart,
    /// What loading had to fill in or ignore.
    pub report: LoadReport,
    /// The folder's `derived_terms.tsv` (what kb-train derived from its training labels), used
    /// by grounded decoding; `None` when the folder has none.
    pub derived_terms: Option<DerivedTerms>,
    /// The resolved model folder.
    pub dir: PathBuf,
}

impl KeywordModel {
    /// Resolves `spec` (folder or hub id) and loads everything from it.
    pub fn load(spec: &str, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(spec, &LoadOptions::new(dtype), device)
    }

    /// [`KeywordModel::load`] with `options` (quantization, key/value cache dtype).
    pub fn load_with(spec: &str, options: &LoadOptions, device: &Device) -> Result<Self> {
        options.check(device)?;
        let dir = ModelSource::parse(spec).resolve()?;
        Self::load_dir_with(&dir, options, device)
    }

    /// Loads a model folder.
    pub fn load_dir(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_dir_with(dir, &LoadOptions::new(dtype), device)
    }

    /// [`KeywordModel::load_dir`] with `options` (quantization, key/value cache dtype).
    pub fn load_dir_with(dir: &Path, options: &LoadOptions, device: &Device) -> Result<Self> {
        options.check(device)?;
        let dtype = options.dtype;
        let config = BartConfig::from_file(&dir.join("config.json"))?;
        let generation = GenerationConfig::from_model_dir(dir, &config)?;
        let tokenizer = KoTokenizer::from_model_dir(dir, &config)?;
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(Error::Tokenizer(format!(
                "{}: the tokenizer has {} tokens but config.json's vocab_size is {}",
                dir.join("tokenizer.json").display(),
                tokenizer.vocab_size(),
                config.vocab_size
            )));
        }
        let files = WeightFiles::find(dir)?;
        // Read lazily: each layer's weights are packed or quantized as soon as it is built.
        let weights = LazyWeights::open(&files, &config)?;
        let report = weights.report().clone();
        let vb = weights.into_var_builder(dtype, device);
        let mut model = Bart::load_quantized(&config, vb, options.quantization)?;
        model.set_kv_cache_dtype(options.kv_cache_dtype)?;
        let terms_path = dir.join(DERIVED_TERMS_FILE);
        let derived_terms = if terms_path.is_file() {
            Some(DerivedTerms::read(&terms_path)?)
        } else {
            None
        };
        Ok(Self {
            config,
            generation,
            tokenizer,
            model,
            report,
            derived_terms,
            dir: dir.to_path_buf(),
        })
    }

    /// The grounding constraint of this model's tokenizer with `terms` (the folder's own list
    /// when `None`); an error when neither exists.
    pub fn grounding(&self, terms: Option<&DerivedTerms>) -> Result<Arc<Grounding>> {
        let terms = terms.or(self.derived_terms.as_ref()).ok_or_else(|| {
            Error::Invalid(format!(
                "grounded decoding needs a list of derived terms: {} has no {DERIVED_TERMS_FILE}; give one (e.g. configs/derived_terms.tsv)",
                self.dir.display()
            ))
        })?;
        Ok(Arc::new(Grounding::new(&self.tokenizer, terms)))
    }

    /// Encodes queries, truncating each to `max_input_tokens` (and to the model's positions).
    pub fn encode_queries(
        &self,
        queries: &[&str],
        max_input_tokens: Option<usize>,
    ) -> Result<Vec<Vec<u32>>> {
        let limit = max_input_tokens
            .unwrap_or(usize::MAX)
            .min(self.config.max_position_embeddings);
        let mut rows = self.tokenizer.encode_batch(queries)?;
        for (row, q) in rows.iter_mut().zip(queries) {
            if row.is_empty() {
                return Err(Error::Invalid(format!(
                    "query {q:?} has no tokens after tokenization"
                )));
            }
            row.truncate(limit);
        }
        Ok(rows)
    }

    /// Extracts keywords for `queries` in one batch with `generation` settings.
    pub fn extract(
        &self,
        queries: &[&str],
        generation: &GenerationConfig,
        max_input_tokens: Option<usize>,
    ) -> Result<Vec<Extraction>> {
        let inputs = self.encode_queries(queries, max_input_tokens)?;
        self.extract_encoded(queries, &inputs, generation)
    }

    /// Extracts keywords for any number of queries: each is tokenized once, queries of similar
    /// token length are generated together in batches of `batch_size`, and results come back in
    /// input order. `progress` is called with the number of queries each batch finished.
    pub fn extract_all(
        &self,
        queries: &[&str],
        generation: &GenerationConfig,
        max_input_tokens: Option<usize>,
        batch_size: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<Extraction>> {
        if batch_size == 0 {
            return Err(Error::Invalid("batch size must be at least 1".into()));
        }
        let encoded = self.encode_queries(queries, max_input_tokens)?;
        let mut order: Vec<usize> = (0..queries.len()).collect();
        order.sort_by_key(|&i| encoded[i].len());
        let mut results: Vec<Option<Extraction>> = vec![None; queries.len()];
        for chunk in order.chunks(batch_size) {
            let batch: Vec<&str> = chunk.iter().map(|&i| queries[i]).collect();
            let inputs: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i].clone()).collect();
            for (&i, r) in chunk
                .iter()
                .zip(self.extract_encoded(&batch, &inputs, generation)?)
            {
                results[i] = Some(r);
            }
            progress(chunk.len());
        }
        Ok(results.into_iter().flatten().collect())
    }

    fn extract_encoded(
        &self,
        queries: &[&str],
        inputs: &[Vec<u32>],
        generation: &GenerationConfig,
    ) -> Result<Vec<Extraction>> {
        let outputs = generate(&self.model, inputs, generation)?;
        queries
            .iter()
            .zip(outputs)
            .map(|(q, out)| {
                let text = self.tokenizer.decode(&out.ids)?;
                Ok(Extraction {
                    query: q.to_string(),
                    keywords: split_keywords(&text),
                    text,
                    ids: out.ids,
                    score: out.score,
                })
            })
            .collect()
    }
}
