//! The KoBART tokenizer: a `tokenizer.json` used the way `PreTrainedTokenizerFast` uses it for
//! KoBART — `encode` adds no special tokens, `decode` skips them.

use std::path::{Path, PathBuf};

use crate::config::BartConfig;
use crate::error::{Error, Result};

/// Special token ids, taken from `config.json` and checked against the tokenizer's vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Padding id.
    pub pad: u32,
    /// End-of-sequence ids (the first is appended to labels in training).
    pub eos: Vec<u32>,
    /// Beginning-of-sequence id, if any.
    pub bos: Option<u32>,
    /// Decoder start id.
    pub decoder_start: u32,
    /// Unknown-token id, if the tokenizer has one.
    pub unk: Option<u32>,
}

/// A tokenizer with KoBART's encode/decode conventions.
#[derive(Clone)]
pub struct KoTokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
    clean_up_spaces: bool,
    path: PathBuf,
}

impl std::fmt::Debug for KoTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KoTokenizer")
            .field("path", &self.path)
            .field("vocab_size", &self.vocab_size())
            .field("special", &self.special)
            .finish()
    }
}

impl KoTokenizer {
    /// Loads `dir/tokenizer.json` (and `tokenizer_config.json` if present) for a model with `cfg`.
    pub fn from_model_dir(dir: &Path, cfg: &BartConfig) -> Result<Self> {
        let mut tok = Self::from_file(&dir.join("tokenizer.json"), cfg)?;
        let tc = dir.join("tokenizer_config.json");
        if tc.is_file() {
            let text = std::fs::read_to_string(&tc).map_err(|e| Error::io(&tc, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
                path: tc.clone(),
                field: "-".into(),
                message: e.to_string(),
            })?;
            if let Some(b) = v
                .get("clean_up_tokenization_spaces")
                .and_then(|b| b.as_bool())
            {
                tok.clean_up_spaces = b;
            }
        }
        Ok(tok)
    }

    /// Loads a `tokenizer.json`; special ids come from `cfg` and must exist in the vocabulary.
    pub fn from_file(path: &Path, cfg: &BartConfig) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Self::new(inner, cfg, path)
    }

    /// Wraps an in-memory tokenizer (e.g. one just trained); `origin` names it in errors.
    pub fn new(inner: tokenizers::Tokenizer, cfg: &BartConfig, origin: &Path) -> Result<Self> {
        let vocab = inner.get_vocab_size(true) as u32;
        let check = |what: &str, id: u32| -> Result<u32> {
            if id >= vocab {
                return Err(Error::Tokenizer(format!(
                    "{}: config.json's {what} {id} is outside the tokenizer's vocabulary of {vocab}",
                    origin.display()
                )));
            }
            Ok(id)
        };
        let pad = check("pad_token_id", cfg.pad_token_id.unwrap_or(1))?;
        let eos = cfg
            .eos_ids()
            .into_iter()
            .map(|id| check("eos_token_id", id))
            .collect::<Result<Vec<_>>>()?;
        if eos.is_empty() {
            return Err(Error::Tokenizer(format!(
                "{}: config.json defines no eos_token_id",
                origin.display()
            )));
        }
        let bos = cfg
            .bos_token_id
            .map(|id| check("bos_token_id", id))
            .transpose()?;
        let decoder_start = check("decoder_start_token_id", cfg.decoder_start())?;
        let unk = inner.token_to_id("<unk>");
        Ok(Self {
            inner,
            special: SpecialTokens {
                pad,
                eos,
                bos,
                decoder_start,
                unk,
            },
            clean_up_spaces: false,
            path: origin.to_path_buf(),
        })
    }

    /// Special token ids.
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Every token's text as it appears in decoded output, by id: the vocabulary piece, with the
    /// word-boundary mark `▁` kept (it stands for a space). `None` for special tokens (pad, eos,
    /// bos, the decoder start, `<unk>` and the tokenizer's special added tokens), which are never
    /// part of the text.
    pub fn piece_texts(&self) -> Vec<Option<String>> {
        let special_added: std::collections::HashSet<u32> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let s = &self.special;
        (0..self.vocab_size() as u32)
            .map(|id| {
                let special = special_added.contains(&id)
                    || id == s.pad
                    || s.eos.contains(&id)
                    || s.bos == Some(id)
                    || id == s.decoder_start
                    || s.unk == Some(id);
                if special {
                    None
                } else {
                    self.inner.id_to_token(id)
                }
            })
            .collect()
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of `text`, without special tokens (KoBART's `tokenizer.encode`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes several texts (in parallel when the tokenizer allows it).
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encs = self
            .inner
            .encode_batch(texts.to_vec(), false)
            .map_err(|e| Error::Tokenizer(format!("cannot encode batch: {e}")))?;
        Ok(encs.into_iter().map(|e| e.get_ids().to_vec()).collect())
    }

    /// Text of `ids`, skipping special tokens (`decode(ids, skip_special_tokens=True)`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .inner
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(format!("cannot decode {ids:?}: {e}")))?;
        Ok(if self.clean_up_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// Writes `tokenizer.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner
            .save(&path, false)
            .map_err(|e| Error::Tokenizer(format!("cannot write {}: {e}", path.display())))
    }
}

/// transformers' `clean_up_tokenization`: removes spaces before punctuation and English contractions.
pub fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}
