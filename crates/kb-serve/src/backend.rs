//! The model side: loading a [`KeywordModel`], the limits that follow from it, tokenizing
//! queries for the HTTP layer, and batched generation for the inference worker.
//!
//! Independent of the command line and of HTTP: it takes a plain [`BackendOptions`] and fails
//! with its own errors ([`BackendError`] at start-up, [`InputError`] for a request's input); the
//! HTTP layer maps them onto status codes. Messages name the server option involved (`--…`),
//! which is how operators and clients know the limits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kb_core::candle_core::DType;
use kb_core::generation::{DerivedTerms, Grounding};
use kb_core::keywords::{join_keywords, split_keywords};
use kb_core::synonyms::Synonyms;
use kb_core::{GenerationConfig, KeywordModel, KoTokenizer, LoadOptions, Quantization};

/// What the backend is started with: the model, its generation limits and the synonyms.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Model folder or Hugging Face hub id.
    pub model: String,
    /// Weight dtype.
    pub dtype: DType,
    /// Device: `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Weight quantization (int8: CPU only).
    pub quantization: Quantization,
    /// dtype of the decoder's key/value caches (`None`: `dtype`).
    pub kv_cache_dtype: Option<DType>,
    /// Beams used when a request does not ask for a number.
    pub num_beams: usize,
    /// Largest `num_beams` a request may ask for.
    pub max_num_beams: usize,
    /// Decoder length limit (counting the start token); `None`: the model folder's setting,
    /// capped at the model's positions.
    pub max_length: Option<usize>,
    /// Token limit per query; `None`: the model's positions.
    pub max_input_tokens: Option<usize>,
    /// Cut over-long queries instead of refusing them.
    pub truncate: bool,
    /// Most queries in one request.
    pub max_client_batch_size: usize,
    /// Synonyms file mapping keywords to canonical terms.
    pub synonyms: Option<PathBuf>,
    /// Grounded decoding for requests that do not choose (see
    /// [`kb_core::generation::grounding`]).
    pub grounded: bool,
    /// Derived terms for grounded decoding; `None`: the model folder's `derived_terms.tsv`
    /// (without either, requests cannot ask for grounding).
    pub derived_terms: Option<PathBuf>,
}

/// Why the backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The device could not be opened or parsed.
    #[error("{0}")]
    Device(kb_core::Error),
    /// The model could not be found or loaded.
    #[error("cannot load model `{model}`: {source}")]
    Load {
        /// The model as given.
        model: String,
        /// Why.
        source: kb_core::Error,
    },
    /// The synonyms file is unreadable or malformed.
    #[error("--synonyms: {0}")]
    Synonyms(kb_core::Error),
    /// A limit contradicts the model (e.g. a `max_length` beyond its positions).
    #[error("{0}")]
    Limits(String),
    /// The warm-up generation failed.
    #[error("warm-up: {0}")]
    WarmUp(String),
    /// The derived terms of grounded decoding are missing or malformed.
    #[error("--grounded: {0}")]
    Grounding(kb_core::Error),
    /// Loading panicked.
    #[error("loading the model panicked: {0}")]
    Panicked(String),
}

/// Why a request's input is refused (well-formed, but empty, too long or out of range).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// Generation settings that may differ between requests; requests are batched only with
/// others that have the same settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GenParams {
    /// Beam count (1 = greedy).
    pub num_beams: usize,
    /// Decoder length limit, counting the decoder start token.
    pub max_length: usize,
    /// Grounded decoding (keywords limited to spans of the query and derived terms).
    pub grounded: bool,
}

/// What generation produced for one query.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// Keywords, in the model's order, deduplicated.
    pub keywords: Vec<String>,
    /// The generated text, special tokens skipped (what the original server answered).
    pub text: String,
    /// Number of generated tokens.
    pub tokens: usize,
}

/// Runs batched generation; implemented by [`Backend`] (and by fakes in tests).
pub trait Generate {
    /// Generates one output per input row, all in one batch with `params`, handing each to
    /// `ready` with its row index as soon as it is final (rows that finish early are handed
    /// over before the batch ends). A row whose `wanted` turns false (asked between decoding
    /// steps) may be dropped without an output. On `Ok`, every row still wanted has been
    /// handed over once.
    fn generate(
        &self,
        inputs: &[Vec<u32>],
        params: GenParams,
        ready: &mut dyn FnMut(usize, Output),
        wanted: &dyn Fn(usize) -> bool,
    ) -> Result<(), String>;
}

/// A loaded model with the server's generation defaults.
#[derive(Debug)]
pub struct Backend {
    model: KeywordModel,
    base: GenerationConfig,
    synonyms: Option<Synonyms>,
    /// The grounding constraint, when derived terms are available.
    grounding: Option<Arc<Grounding>>,
}

impl Backend {
    /// Loads `options.model` on `options.device` with `options.dtype`, its quantization and
    /// cache dtype, and the synonyms file.
    pub fn load(options: &BackendOptions) -> Result<Self, BackendError> {
        let device = kb_core::parse_device(&options.device).map_err(BackendError::Device)?;
        let load = LoadOptions {
            dtype: options.dtype,
            quantization: options.quantization,
            kv_cache_dtype: options.kv_cache_dtype,
        };
        // Refused before any weight is read (int8 on a GPU).
        load.check(&device).map_err(BackendError::Device)?;
        let model = KeywordModel::load_with(&options.model, &load, &device).map_err(|e| {
            BackendError::Load {
                model: options.model.clone(),
                source: e,
            }
        })?;
        let note = model.report.summary();
        if !note.is_empty() {
            tracing::warn!("{note}");
        }
        tracing::info!(
            quantization = %model.model.quantization(),
            kv_cache_dtype = ?model.model.kv_cache_dtype(),
            weight_matrices_mib = format!("{:.1}", model.model.matrix_bytes() as f64 / 1048576.0),
            "model storage"
        );
        let base = model.generation.clone();
        let synonyms = options
            .synonyms
            .as_deref()
            .map(Synonyms::read)
            .transpose()
            .map_err(BackendError::Synonyms)?;
        let terms = options
            .derived_terms
            .as_deref()
            .map(DerivedTerms::read)
            .transpose()
            .map_err(BackendError::Grounding)?;
        let grounding = if terms.is_some() || model.derived_terms.is_some() {
            Some(
                model
                    .grounding(terms.as_ref())
                    .map_err(BackendError::Grounding)?,
            )
        } else if options.grounded {
            // Refused now rather than on every request.
            return Err(BackendError::Grounding(
                model.grounding(None).expect_err("no derived terms"),
            ));
        } else {
            None
        };
        Ok(Self {
            model,
            base,
            synonyms,
            grounding,
        })
    }

    /// Works out the limits and defaults for this model and the given options.
    pub fn info(&self, options: &BackendOptions) -> Result<ModelInfo, BackendError> {
        let mut info = ModelInfo::new(
            &options.model,
            self.model.tokenizer.clone(),
            &self.base,
            self.model.config.max_position_embeddings,
            options,
        )?;
        info.grounding_available = self.grounding.is_some();
        Ok(info)
    }

    /// Runs one generation so that the first request does not pay for lazy initialisation.
    pub fn warm_up(&self, info: &ModelInfo) -> Result<Duration, BackendError> {
        let started = Instant::now();
        let ids = info
            .tokenizer
            .encode("이사화물 통관예약을 하면 뭐가 좋나요?")
            .map_err(|e| BackendError::WarmUp(e.to_string()))?;
        let mut ids = if ids.is_empty() {
            vec![info.tokenizer.special().eos[0]]
        } else {
            ids
        };
        ids.truncate(info.max_input_tokens);
        self.generate(&[ids], info.defaults, &mut |_, _| {}, &|_| true)
            .map_err(|e| BackendError::WarmUp(format!("generation failed: {e}")))?;
        Ok(started.elapsed())
    }
}

impl Generate for Backend {
    fn generate(
        &self,
        inputs: &[Vec<u32>],
        params: GenParams,
        ready: &mut dyn FnMut(usize, Output),
        wanted: &dyn Fn(usize) -> bool,
    ) -> Result<(), String> {
        let mut gen = self.base.clone();
        gen.num_beams = params.num_beams;
        gen.max_length = params.max_length;
        gen.max_new_tokens = None;
        if params.grounded {
            gen.grounding = Some(
                self.grounding
                    .clone()
                    .ok_or("grounded decoding asked for, but the server has no derived terms")?,
            );
        }
        let mut decode_error = None;
        let mut done = |i: usize, g: kb_core::Generated| match self.model.tokenizer.decode(&g.ids) {
            Ok(text) => {
                let (keywords, text) = answer(text, self.synonyms.as_ref());
                ready(
                    i,
                    Output {
                        keywords,
                        text,
                        tokens: g.ids.len(),
                    },
                );
            }
            Err(e) => {
                decode_error.get_or_insert_with(|| format!("decoding input {i}: {e}"));
            }
        };
        let generated =
            kb_core::generate_each_while(&self.model.model, inputs, &gen, &mut done, wanted);
        // The batch's buffers are freed: hand them back rather than hold the largest batch's.
        kb_core::allocator::release_freed_memory();
        generated.map_err(|e| e.to_string())?;
        decode_error.map_or(Ok(()), Err)
    }
}

/// The keywords of generated `text`, and the text to answer: unchanged without synonyms; with
/// them, keywords mapped to their canonical terms (repeats removed) and the text re-joined.
fn answer(text: String, synonyms: Option<&Synonyms>) -> (Vec<String>, String) {
    let keywords = split_keywords(&text);
    match synonyms {
        None => (keywords, text),
        Some(s) => {
            let mapped = s.apply(&keywords);
            let text = join_keywords(&mapped);
            (mapped, text)
        }
    }
}

/// What the HTTP layer needs once the model is ready: its name, tokenizer and limits.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The model as given to `--model`.
    pub name: String,
    /// The model's tokenizer (requests are tokenized off the inference thread).
    pub tokenizer: KoTokenizer,
    /// Settings used when a request does not choose.
    pub defaults: GenParams,
    /// Largest `num_beams` a request may ask for.
    pub max_num_beams: usize,
    /// Token limit per query.
    pub max_input_tokens: usize,
    /// Whether over-long queries are cut rather than refused.
    pub truncate: bool,
    /// Most queries per `/v1/keywords` request.
    pub max_client_batch_size: usize,
    /// Whether requests may ask for grounded decoding (derived terms are loaded).
    pub grounding_available: bool,
}

impl ModelInfo {
    /// The limits and defaults of a model named `name` (as given to `--model`) with `tokenizer`,
    /// generation settings `generation` from its folder and `max_pos` positions, under `options`.
    pub fn new(
        name: &str,
        tokenizer: KoTokenizer,
        generation: &GenerationConfig,
        max_pos: usize,
        options: &BackendOptions,
    ) -> Result<Self, BackendError> {
        let max_length = match options.max_length {
            Some(n) if n > max_pos => {
                return Err(BackendError::Limits(format!(
                    "--max_length {n} exceeds the model's max_position_embeddings {max_pos}"
                )))
            }
            Some(n) => n,
            None => {
                let from_folder = generation.effective_max_length();
                if from_folder > max_pos {
                    tracing::warn!(
                        from_folder,
                        max_pos,
                        "the model's generation max_length exceeds its positions; using max_position_embeddings"
                    );
                }
                from_folder.clamp(2, max_pos.max(2))
            }
        };
        let max_input_tokens = match options.max_input_tokens {
            Some(n) if n > max_pos => {
                return Err(BackendError::Limits(format!(
                    "--max_input_tokens {n} exceeds the model's max_position_embeddings {max_pos}"
                )))
            }
            Some(n) => n,
            None => max_pos,
        };
        Ok(ModelInfo {
            name: name.to_string(),
            tokenizer,
            defaults: GenParams {
                num_beams: options.num_beams,
                max_length,
                grounded: options.grounded,
            },
            max_num_beams: options.max_num_beams,
            max_input_tokens,
            truncate: options.truncate,
            max_client_batch_size: options.max_client_batch_size,
            grounding_available: options.grounded || options.derived_terms.is_some(),
        })
    }

    /// The generation settings for a request, checking the asked-for values against the limits.
    pub fn params(
        &self,
        num_beams: Option<usize>,
        max_length: Option<usize>,
        grounded: Option<bool>,
    ) -> Result<GenParams, InputError> {
        let mut p = self.defaults;
        if let Some(g) = grounded {
            if g && !self.grounding_available {
                return Err(InputError(
                    "field `grounded`: this server has no derived terms (start it with --derived_terms FILE, or serve a model folder with derived_terms.tsv)".into(),
                ));
            }
            p.grounded = g;
        }
        if let Some(n) = num_beams {
            if n == 0 || n > self.max_num_beams {
                return Err(InputError(format!(
                    "field `num_beams` must be between 1 and {} (--max_num_beams), got {n}",
                    self.max_num_beams
                )));
            }
            p.num_beams = n;
        }
        if let Some(n) = max_length {
            if n < 2 || n > self.defaults.max_length {
                return Err(InputError(format!(
                    "field `max_length` must be between 2 and {} (--max_length), got {n}",
                    self.defaults.max_length
                )));
            }
            p.max_length = n;
        }
        Ok(p)
    }

    /// Tokenizes queries, refusing (or, with `--truncate`, cutting) those over the token limit.
    /// `field(i)` names query `i` in error messages, e.g. `` `queries[2]` ``.
    pub fn encode(
        &self,
        queries: &[String],
        field: impl Fn(usize) -> String,
    ) -> Result<Vec<Vec<u32>>, InputError> {
        queries
            .iter()
            .enumerate()
            .map(|(i, q)| {
                if q.trim().is_empty() {
                    return Err(InputError(format!("field {} is empty", field(i))));
                }
                let mut ids = self.tokenizer.encode(q).map_err(|e| {
                    InputError(format!("field {} cannot be tokenized: {e}", field(i)))
                })?;
                if ids.is_empty() {
                    return Err(InputError(format!(
                        "field {} has no tokens after tokenization",
                        field(i)
                    )));
                }
                if ids.len() > self.max_input_tokens {
                    if !self.truncate {
                        return Err(InputError(format!(
                            "field {} has {} tokens; the limit is {} (--max_input_tokens; start the server with --truncate to cut instead)",
                            field(i),
                            ids.len(),
                            self.max_input_tokens
                        )));
                    }
                    ids.truncate(self.max_input_tokens);
                }
                Ok(ids)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synonyms_map_the_answer() {
        let text = "직구 , 통관번호, 해외직구, 관세".to_string();
        let (k, t) = answer(text.clone(), None);
        assert_eq!(k, ["직구", "통관번호", "해외직구", "관세"]);
        assert_eq!(t, text);
        let s = Synonyms::parse(
            "해외직구\t직구\n개인통관고유부호\t통관번호\n",
            std::path::Path::new("s.tsv"),
        )
        .unwrap();
        let (k, t) = answer(text, Some(&s));
        assert_eq!(k, ["해외직구", "개인통관고유부호", "관세"]);
        assert_eq!(t, "해외직구, 개인통관고유부호, 관세");
    }
}
