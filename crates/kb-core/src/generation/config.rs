//! Generation settings, with transformers' `GenerationConfig` defaults and file semantics.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::grounding::Grounding;
use crate::config::{BartConfig, TokenIds};
use crate::error::{Error, Result};

/// When beam search may stop (transformers' `early_stopping`: `true`, `false` or `"never"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    /// Stop once no running beam can plausibly beat the finished ones (heuristic, the default).
    #[default]
    Heuristic,
    /// Stop as soon as `num_beams` hypotheses are finished.
    True,
    /// Canonical beam search: stop only when no better hypothesis is possible.
    Never,
}

impl EarlyStopping {
    /// Parses a JSON value as transformers does.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        match v {
            serde_json::Value::Bool(true) => Some(EarlyStopping::True),
            serde_json::Value::Bool(false) | serde_json::Value::Null => {
                Some(EarlyStopping::Heuristic)
            }
            serde_json::Value::String(s) if s == "never" => Some(EarlyStopping::Never),
            _ => None,
        }
    }

    /// The JSON value transformers writes.
    pub fn to_json(self) -> serde_json::Value {
        match self {
            EarlyStopping::Heuristic => serde_json::Value::Bool(false),
            EarlyStopping::True => serde_json::Value::Bool(true),
            EarlyStopping::Never => serde_json::Value::String("never".into()),
        }
    }
}

impl std::str::FromStr for EarlyStopping {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "true" | "True" => Ok(EarlyStopping::True),
            "false" | "False" | "heuristic" => Ok(EarlyStopping::Heuristic),
            "never" => Ok(EarlyStopping::Never),
            _ => Err(format!("`{s}` is not one of true, false, never")),
        }
    }
}

/// Decoding settings for [`crate::generation::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Beams (1 = greedy).
    pub num_beams: usize,
    /// Maximum decoder length, counting the decoder start token (transformers' `max_length`).
    pub max_length: usize,
    /// If set, overrides `max_length` as `max_new_tokens + 1`.
    pub max_new_tokens: Option<usize>,
    /// Minimum decoder length counting the start token: eos is banned before it.
    pub min_length: usize,
    /// Exponent on the length when scoring finished beams.
    pub length_penalty: f64,
    /// Beam-search stopping rule.
    pub early_stopping: EarlyStopping,
    /// Bans repeating any n-gram of this size (0 = off).
    pub no_repeat_ngram_size: usize,
    /// Token forced when one position remains before `max_length`.
    pub forced_eos_token_id: Option<u32>,
    /// Token forced as the first generated token.
    pub forced_bos_token_id: Option<u32>,
    /// First decoder input.
    pub decoder_start_token_id: u32,
    /// Tokens that end a sequence.
    pub eos_token_ids: Vec<u32>,
    /// Token that fills finished greedy rows.
    pub pad_token_id: Option<u32>,
    /// Grounded decoding: keywords limited to spans of the input and derived terms
    /// ([`Grounding`]); `None` decodes freely, as transformers does.
    pub grounding: Option<Arc<Grounding>>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
struct RawGenerationConfig {
    num_beams: Option<usize>,
    max_length: Option<usize>,
    max_new_tokens: Option<usize>,
    min_length: Option<usize>,
    length_penalty: Option<f64>,
    early_stopping: Option<serde_json::Value>,
    no_repeat_ngram_size: Option<usize>,
    forced_eos_token_id: Option<u32>,
    forced_bos_token_id: Option<u32>,
    decoder_start_token_id: Option<u32>,
    eos_token_id: Option<TokenIds>,
    pad_token_id: Option<u32>,
    do_sample: Option<bool>,
}

impl GenerationConfig {
    /// transformers' defaults, with token ids and legacy generation fields from `config.json`
    /// (what `GenerationConfig.from_model_config` does when a folder has no `generation_config.json`).
    pub fn from_model_config(cfg: &BartConfig) -> Result<Self> {
        let early_stopping = match &cfg.early_stopping {
            None => EarlyStopping::Heuristic,
            Some(v) => EarlyStopping::from_json(v).ok_or_else(|| Error::Config {
                path: "config.json".into(),
                field: "early_stopping".into(),
                message: format!("{v} is not true, false or \"never\""),
            })?,
        };
        let out = Self {
            num_beams: cfg.num_beams.unwrap_or(1),
            max_length: cfg.max_length.unwrap_or(20),
            max_new_tokens: None,
            min_length: cfg.min_length.unwrap_or(0),
            length_penalty: cfg.length_penalty.unwrap_or(1.0),
            early_stopping,
            no_repeat_ngram_size: cfg.no_repeat_ngram_size.unwrap_or(0),
            forced_eos_token_id: cfg.forced_eos_token_id,
            forced_bos_token_id: cfg.forced_bos(),
            decoder_start_token_id: cfg.decoder_start(),
            eos_token_ids: cfg.eos_ids(),
            pad_token_id: cfg.pad_token_id,
            grounding: None,
        };
        out.validate().map_err(|(field, message)| Error::Config {
            path: "config.json".into(),
            field: field.into(),
            message,
        })?;
        Ok(out)
    }

    /// The folder's `generation_config.json` if it has one (transformers then ignores the
    /// generation fields of `config.json`), else [`GenerationConfig::from_model_config`].
    pub fn from_model_dir(dir: &Path, cfg: &BartConfig) -> Result<Self> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Self::from_model_config(cfg);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json_str(&text, &path, cfg)
    }

    /// Parses `generation_config.json` text; missing token ids fall back to `cfg`.
    pub fn from_json_str(text: &str, path: &Path, cfg: &BartConfig) -> Result<Self> {
        let raw: RawGenerationConfig = crate::config::parse_json(text, path)?;
        if raw.do_sample == Some(true) {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: "do_sample".into(),
                message: "sampling is not supported; kb-core decodes greedily or with beam search"
                    .into(),
            });
        }
        let early_stopping = match &raw.early_stopping {
            None => EarlyStopping::Heuristic,
            Some(v) => EarlyStopping::from_json(v).ok_or_else(|| Error::Config {
                path: path.to_path_buf(),
                field: "early_stopping".into(),
                message: format!("{v} is not true, false or \"never\""),
            })?,
        };
        let out = Self {
            num_beams: raw.num_beams.unwrap_or(1),
            max_length: raw.max_length.unwrap_or(20),
            max_new_tokens: raw.max_new_tokens,
            min_length: raw.min_length.unwrap_or(0),
            length_penalty: raw.length_penalty.unwrap_or(1.0),
            early_stopping,
            no_repeat_ngram_size: raw.no_repeat_ngram_size.unwrap_or(0),
            forced_eos_token_id: raw.forced_eos_token_id,
            forced_bos_token_id: raw.forced_bos_token_id,
            decoder_start_token_id: raw.decoder_start_token_id.unwrap_or(cfg.decoder_start()),
            eos_token_ids: raw
                .eos_token_id
                .map(|t| t.to_vec())
                .unwrap_or_else(|| cfg.eos_ids()),
            pad_token_id: raw.pad_token_id.or(cfg.pad_token_id),
            grounding: None,
        };
        out.validate().map_err(|m| Error::Config {
            path: path.to_path_buf(),
            field: m.0.into(),
            message: m.1,
        })?;
        let ids = [
            ("decoder_start_token_id", Some(out.decoder_start_token_id)),
            ("pad_token_id", out.pad_token_id),
            ("forced_eos_token_id", out.forced_eos_token_id),
            ("forced_bos_token_id", out.forced_bos_token_id),
        ]
        .into_iter()
        .filter_map(|(field, id)| id.map(|id| (field, id)))
        .chain(out.eos_token_ids.iter().map(|&id| ("eos_token_id", id)));
        for (field, id) in ids {
            if id as usize >= cfg.vocab_size {
                return Err(Error::Config {
                    path: path.to_path_buf(),
                    field: field.into(),
                    message: format!(
                        "id {id} is outside the model's vocabulary (config.json's vocab_size {})",
                        cfg.vocab_size
                    ),
                });
            }
        }
        Ok(out)
    }

    /// The decoder length limit in effect (counting the start token).
    pub fn effective_max_length(&self) -> usize {
        match self.max_new_tokens {
            // `usize::MAX` new tokens is no limit (generation refuses it beyond the positions).
            Some(n) => n.saturating_add(1),
            None => self.max_length,
        }
    }

    /// Checks the settings for contradictions; returns the offending field and why.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.num_beams == 0 {
            return Err(("num_beams", "must be at least 1".into()));
        }
        if self.effective_max_length() < 2 {
            return Err((
                "max_length",
                "must allow at least one generated token (max_length ≥ 2 or max_new_tokens ≥ 1)"
                    .into(),
            ));
        }
        if !self.length_penalty.is_finite() {
            return Err(("length_penalty", "must be a finite number".into()));
        }
        if self.eos_token_ids.is_empty() {
            return Err((
                "eos_token_id",
                "at least one end-of-sequence token is needed".into(),
            ));
        }
        Ok(())
    }

    /// The settings as `generation_config.json` content.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "num_beams": self.num_beams,
            "max_length": self.max_length,
            "min_length": self.min_length,
            "length_penalty": self.length_penalty,
            "early_stopping": self.early_stopping.to_json(),
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
            "decoder_start_token_id": self.decoder_start_token_id,
            "eos_token_id": if self.eos_token_ids.len() == 1 { serde_json::json!(self.eos_token_ids[0]) } else { serde_json::json!(self.eos_token_ids) },
            "forced_eos_token_id": self.forced_eos_token_id,
            "pad_token_id": self.pad_token_id,
        });
        if let Some(n) = self.max_new_tokens {
            v["max_new_tokens"] = n.into();
        }
        if let Some(b) = self.forced_bos_token_id {
            v["forced_bos_token_id"] = b.into();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kobart() -> BartConfig {
        BartConfig::from_json_str(
            r#"{"eos_token_id": 1, "pad_token_id": 3, "decoder_start_token_id": 1, "forced_eos_token_id": 1, "vocab_size": 100}"#,
            Path::new("config.json"),
        )
        .unwrap()
    }

    #[test]
    fn model_config_defaults() {
        let g = GenerationConfig::from_model_config(&kobart()).unwrap();
        assert_eq!(g.num_beams, 1);
        assert_eq!(g.max_length, 20);
        assert_eq!(g.eos_token_ids, vec![1]);
        assert_eq!(g.forced_eos_token_id, Some(1));
        assert_eq!(g.early_stopping, EarlyStopping::Heuristic);
    }

    /// Found by tests/fuzz_parsers.rs: settings taken from config.json (a folder without
    /// generation_config.json) were not validated, so `max_length` 0 or an empty `eos_token_id`
    /// list loaded and only failed at the first generation.
    #[test]
    fn model_config_settings_are_validated() {
        for (json, field) in [
            (r#"{"max_length": 1}"#, "max_length"),
            (r#"{"num_beams": 0}"#, "num_beams"),
            (r#"{"eos_token_id": []}"#, "eos_token_id"),
        ] {
            let cfg = BartConfig::from_json_str(json, Path::new("config.json")).unwrap();
            let err = GenerationConfig::from_model_config(&cfg)
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("config.json: field `{field}`: ")),
                "{json}: {err}"
            );
        }
    }

    #[test]
    fn generation_file_overrides_and_falls_back() {
        let g = GenerationConfig::from_json_str(
            r#"{"num_beams": 5, "early_stopping": "never", "max_new_tokens": 7}"#,
            Path::new("generation_config.json"),
            &kobart(),
        )
        .unwrap();
        assert_eq!(g.num_beams, 5);
        assert_eq!(g.early_stopping, EarlyStopping::Never);
        assert_eq!(g.effective_max_length(), 8);
        assert_eq!(g.decoder_start_token_id, 1);
        assert_eq!(
            g.forced_eos_token_id, None,
            "the file, not config.json, decides"
        );
    }

    /// Found by tests/fuzz_parsers.rs: token ids outside the model's vocabulary were accepted
    /// (an eos the model can never produce, a forced token that forces nothing).
    #[test]
    fn token_ids_must_be_in_the_vocabulary() {
        for field in [
            "eos_token_id",
            "pad_token_id",
            "decoder_start_token_id",
            "forced_eos_token_id",
            "forced_bos_token_id",
        ] {
            let path = Path::new("generation_config.json");
            let err =
                GenerationConfig::from_json_str(&format!(r#"{{"{field}": 100}}"#), path, &kobart())
                    .unwrap_err()
                    .to_string();
            assert!(
                err.starts_with(&format!("generation_config.json: field `{field}`: "))
                    && err.contains("vocab_size 100"),
                "{err}"
            );
            GenerationConfig::from_json_str(&format!(r#"{{"{field}": 99}}"#), path, &kobart())
                .unwrap();
        }
        let err = GenerationConfig::from_json_str(
            r#"{"eos_token_id": [1, 100]}"#,
            Path::new("generation_config.json"),
            &kobart(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("field `eos_token_id`"), "{err}");
    }

    /// Found by tests/fuzz_parsers.rs: `max_new_tokens` usize::MAX overflowed computing the
    /// length limit (`max_new_tokens + 1`) while validating the file.
    #[test]
    fn the_largest_max_new_tokens_does_not_overflow() {
        let g = GenerationConfig::from_json_str(
            &format!(r#"{{"max_new_tokens": {}}}"#, usize::MAX),
            Path::new("generation_config.json"),
            &kobart(),
        )
        .unwrap();
        assert_eq!(g.effective_max_length(), usize::MAX);
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = GenerationConfig::from_json_str(
            r#"{"early_stopping": "sometimes"}"#,
            Path::new("generation_config.json"),
            &kobart(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("early_stopping") && err.contains("generation_config.json"),
            "{err}"
        );
        let err = GenerationConfig::from_json_str(
            r#"{"num_beams": 0}"#,
            Path::new("generation_config.json"),
            &kobart(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("num_beams"), "{err}");
    }
}
