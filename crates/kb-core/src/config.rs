//! `BartConfig`: the model hyper-parameters, read from a Hugging Face `config.json`.
//!
//! Field names and defaults follow transformers' `BartConfig` (and the older fields that
//! KoBART's 2020 configs still carry), so any BART-family `config.json` deserializes as-is.
//! Unknown fields are ignored; values we cannot honour are rejected with an error naming the field.

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Error, Result};

/// Token ids that may be a single id or a list (transformers accepts both for `eos_token_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// All ids as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }

    /// The first id, if any.
    pub fn first(&self) -> Option<u32> {
        self.to_vec().first().copied()
    }
}

impl<'de> Deserialize<'de> for TokenIds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            One(u32),
            Many(Vec<u32>),
        }
        Ok(match Raw::deserialize(d)? {
            Raw::One(id) => TokenIds::One(id),
            Raw::Many(ids) => TokenIds::Many(ids),
        })
    }
}

/// The feed-forward activation functions we implement, by their transformers names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Exact (erf) GELU: transformers' `"gelu"`.
    Gelu,
    /// Tanh-approximated GELU: `"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`.
    #[serde(alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    /// `"relu"`.
    Relu,
    /// `"silu"` / `"swish"`.
    #[serde(alias = "swish")]
    Silu,
    /// `"tanh"`.
    Tanh,
}

fn d_vocab() -> usize {
    50265
}
fn d_max_pos() -> usize {
    1024
}
fn d_layers() -> usize {
    12
}
fn d_ffn() -> usize {
    4096
}
fn d_heads() -> usize {
    16
}
fn d_model() -> usize {
    1024
}
fn d_dropout() -> f64 {
    0.1
}
fn d_init_std() -> f64 {
    0.02
}
fn d_activation() -> String {
    "gelu".into()
}
fn d_pad() -> Option<u32> {
    Some(1)
}
fn d_bos() -> Option<u32> {
    Some(0)
}
fn d_eos() -> Option<TokenIds> {
    Some(TokenIds::One(2))
}
fn d_decoder_start() -> Option<u32> {
    Some(2)
}
fn d_forced_eos() -> Option<u32> {
    Some(2)
}
fn d_true() -> bool {
    true
}
fn d_offset() -> usize {
    2
}

/// BART hyper-parameters as written in a Hugging Face `config.json`.
///
/// Defaults are transformers' `BartConfig` defaults; KoBART-v1 overrides most of them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BartConfig {
    /// `"bart"` (post-LN) or `"mbart"` (pre-LN with final layer norms); absent means bart.
    #[serde(default)]
    pub model_type: Option<String>,
    /// Vocabulary size (rows of the shared embedding).
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    /// Positions the learned position table covers (the table has 2 more rows: BART's offset).
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    /// Hidden width.
    #[serde(default = "d_model")]
    pub d_model: usize,
    /// Encoder layer count.
    #[serde(default = "d_layers")]
    pub encoder_layers: usize,
    /// Encoder feed-forward width.
    #[serde(default = "d_ffn")]
    pub encoder_ffn_dim: usize,
    /// Encoder attention heads.
    #[serde(default = "d_heads")]
    pub encoder_attention_heads: usize,
    /// Decoder layer count.
    #[serde(default = "d_layers")]
    pub decoder_layers: usize,
    /// Decoder feed-forward width.
    #[serde(default = "d_ffn")]
    pub decoder_ffn_dim: usize,
    /// Decoder attention heads.
    #[serde(default = "d_heads")]
    pub decoder_attention_heads: usize,
    /// LayerDrop probability of encoder layers (training only; must be 0 here).
    #[serde(default)]
    pub encoder_layerdrop: f64,
    /// LayerDrop probability of decoder layers (training only; must be 0 here).
    #[serde(default)]
    pub decoder_layerdrop: f64,
    /// Feed-forward activation, by transformers' name.
    #[serde(default = "d_activation")]
    pub activation_function: String,
    /// Dropout on embeddings and sub-layer outputs (training only).
    #[serde(default = "d_dropout")]
    pub dropout: f64,
    /// Dropout on attention probabilities (training only).
    #[serde(default)]
    pub attention_dropout: f64,
    /// Dropout after the feed-forward activation (training only).
    #[serde(default)]
    pub activation_dropout: f64,
    /// Standard deviation used to initialise weights from scratch.
    #[serde(default = "d_init_std")]
    pub init_std: f64,
    /// Multiply token embeddings by `sqrt(d_model)`.
    #[serde(default)]
    pub scale_embedding: bool,
    /// Padding token id.
    #[serde(default = "d_pad")]
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence token id.
    #[serde(default = "d_bos")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token id(s).
    #[serde(default = "d_eos")]
    pub eos_token_id: Option<TokenIds>,
    /// First decoder input token.
    #[serde(default = "d_decoder_start")]
    pub decoder_start_token_id: Option<u32>,
    /// Token forced as the last one when generation reaches `max_length`.
    #[serde(default = "d_forced_eos")]
    pub forced_eos_token_id: Option<u32>,
    /// Token forced as the first generated one.
    #[serde(default)]
    pub forced_bos_token_id: Option<u32>,
    /// Legacy spelling of `forced_bos_token_id = bos_token_id`.
    #[serde(default)]
    pub force_bos_token_to_be_generated: bool,
    /// Pre-LN layers (fairseq / mBART style).
    #[serde(default)]
    pub normalize_before: bool,
    /// A final LayerNorm after the last encoder and decoder layer.
    #[serde(default)]
    pub add_final_layer_norm: bool,
    /// LayerNorm right after the embeddings (`layernorm_embedding`).
    #[serde(default = "d_true")]
    pub normalize_embedding: bool,
    /// The lm head shares the token embedding matrix.
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    /// Legacy field: BART's position offset, always 2.
    #[serde(default = "d_offset")]
    pub extra_pos_embeddings: usize,
    /// Legacy field: sinusoidal positions (unsupported when true).
    #[serde(default)]
    pub static_position_embeddings: bool,
    /// Legacy field: a learned logits bias instead of `final_logits_bias` (unsupported when true).
    #[serde(default)]
    pub add_bias_logits: bool,
    /// Legacy field: Blenderbot-90M layer norm order (unsupported when true).
    #[serde(default)]
    pub do_blenderbot_90_layernorm: bool,
    /// Generation defaults that older configs keep in `config.json`.
    #[serde(default)]
    pub num_beams: Option<usize>,
    /// See [`BartConfig::num_beams`].
    #[serde(default)]
    pub max_length: Option<usize>,
    /// See [`BartConfig::num_beams`].
    #[serde(default)]
    pub min_length: Option<usize>,
    /// See [`BartConfig::num_beams`].
    #[serde(default)]
    pub no_repeat_ngram_size: Option<usize>,
    /// See [`BartConfig::num_beams`].
    #[serde(default)]
    pub length_penalty: Option<f64>,
    /// See [`BartConfig::num_beams`].
    #[serde(default)]
    pub early_stopping: Option<serde_json::Value>,
}

impl BartConfig {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses and validates `config.json` text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let cfg: BartConfig = parse_json(text, path)?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Refuses what kb-core cannot run or what cannot be a working BART, naming the field.
    fn validate(&self, path: &Path) -> Result<()> {
        self.check_family()
            .and_then(|()| self.check_sizes())
            .and_then(|()| self.check_regularisation())
            .and_then(|()| self.check_variants())
            .and_then(|()| self.check_token_ids())
            .map_err(|(field, message)| Error::Config {
                path: path.to_path_buf(),
                field: field.to_string(),
                message,
            })
    }

    /// A BART-family model with an implemented activation.
    fn check_family(&self) -> std::result::Result<(), (&'static str, String)> {
        if let Some(t) = &self.model_type {
            if t != "bart" && t != "mbart" {
                return Err((
                    "model_type",
                    format!("`{t}` is not a BART-family model (expected \"bart\" or \"mbart\")"),
                ));
            }
        }
        self.activation()
            .map(|_| ())
            .map_err(|m| ("activation_function", m))
    }

    /// Positive sizes, and a width the heads divide.
    fn check_sizes(&self) -> std::result::Result<(), (&'static str, String)> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("max_position_embeddings", self.max_position_embeddings),
            ("encoder_ffn_dim", self.encoder_ffn_dim),
            ("decoder_ffn_dim", self.decoder_ffn_dim),
            ("encoder_attention_heads", self.encoder_attention_heads),
            ("decoder_attention_heads", self.decoder_attention_heads),
            // Decoding keeps its state per decoder layer; a decoder without layers has none.
            ("decoder_layers", self.decoder_layers),
        ] {
            if v == 0 {
                return Err((field, "must be greater than 0".into()));
            }
        }
        for (field, heads) in [
            ("encoder_attention_heads", self.encoder_attention_heads),
            ("decoder_attention_heads", self.decoder_attention_heads),
        ] {
            if !self.d_model.is_multiple_of(heads) {
                return Err((
                    field,
                    format!("d_model {} is not divisible by {heads} heads", self.d_model),
                ));
            }
        }
        Ok(())
    }

    /// Dropout probabilities in [0, 1) and no LayerDrop.
    fn check_regularisation(&self) -> std::result::Result<(), (&'static str, String)> {
        for (field, p) in [
            ("dropout", self.dropout),
            ("attention_dropout", self.attention_dropout),
            ("activation_dropout", self.activation_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err((field, format!("{p} is not a probability in [0, 1)")));
            }
        }
        for (field, p) in [
            ("encoder_layerdrop", self.encoder_layerdrop),
            ("decoder_layerdrop", self.decoder_layerdrop),
        ] {
            if p != 0.0 {
                return Err((field, "LayerDrop is not supported; set it to 0.0".into()));
            }
        }
        Ok(())
    }

    /// None of the BART variants kb-core does not implement.
    fn check_variants(&self) -> std::result::Result<(), (&'static str, String)> {
        if self.extra_pos_embeddings != 2 {
            return Err((
                "extra_pos_embeddings",
                format!(
                    "BART's position offset is 2, got {}; such a checkpoint is not BART",
                    self.extra_pos_embeddings
                ),
            ));
        }
        if self
            .max_position_embeddings
            .checked_add(self.extra_pos_embeddings)
            .is_none()
        {
            return Err((
                "max_position_embeddings",
                format!(
                    "{} is too large (the position table has {} more rows)",
                    self.max_position_embeddings, self.extra_pos_embeddings
                ),
            ));
        }
        let unsupported = [
            (
                "static_position_embeddings",
                self.static_position_embeddings,
                "sinusoidal position embeddings are not supported",
            ),
            (
                "add_bias_logits",
                self.add_bias_logits,
                "a learned logits bias layer is not supported (BART uses final_logits_bias)",
            ),
            (
                "do_blenderbot_90_layernorm",
                self.do_blenderbot_90_layernorm,
                "the Blenderbot-90M layer norm variant is not supported",
            ),
        ];
        match unsupported.into_iter().find(|(_, set, _)| *set) {
            Some((field, _, message)) => Err((field, message.into())),
            None => Ok(()),
        }
    }

    /// Special token ids inside the vocabulary, and a decoder start token.
    fn check_token_ids(&self) -> std::result::Result<(), (&'static str, String)> {
        let vocab = self.vocab_size;
        let ids = [
            ("pad_token_id", self.pad_token_id),
            ("bos_token_id", self.bos_token_id),
            ("decoder_start_token_id", self.decoder_start_token_id),
            ("forced_eos_token_id", self.forced_eos_token_id),
            ("forced_bos_token_id", self.forced_bos_token_id),
        ]
        .into_iter()
        .filter_map(|(field, id)| id.map(|id| (field, id)))
        .chain(self.eos_ids().into_iter().map(|id| ("eos_token_id", id)));
        for (field, id) in ids {
            if id as usize >= vocab {
                return Err((
                    field,
                    format!("id {id} is outside the vocabulary (vocab_size {vocab})"),
                ));
            }
        }
        if self.decoder_start_token_id.is_none() {
            return Err((
                "decoder_start_token_id",
                "is null; BART needs a decoder start token".into(),
            ));
        }
        Ok(())
    }

    /// The parsed activation function.
    pub fn activation(&self) -> std::result::Result<Activation, String> {
        serde_json::from_value(serde_json::Value::String(self.activation_function.clone()))
            .map_err(|_| {
                format!(
                    "activation `{}` is not implemented (supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu, swish, tanh)",
                    self.activation_function
                )
            })
    }

    /// Whether layers are pre-LN (mBART, or `normalize_before`).
    pub fn pre_layer_norm(&self) -> bool {
        self.normalize_before || self.model_type.as_deref() == Some("mbart")
    }

    /// Whether encoder and decoder end with their own LayerNorm (mBART, or `add_final_layer_norm`).
    pub fn final_layer_norm(&self) -> bool {
        self.add_final_layer_norm || self.model_type.as_deref() == Some("mbart")
    }

    /// Factor applied to token embeddings.
    pub fn embed_scale(&self) -> f64 {
        if self.scale_embedding {
            (self.d_model as f64).sqrt()
        } else {
            1.0
        }
    }

    /// End-of-sequence ids (possibly several).
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }

    /// The decoder start token (validated to exist).
    pub fn decoder_start(&self) -> u32 {
        self.decoder_start_token_id.unwrap_or(2)
    }

    /// The forced first token, honouring the legacy `force_bos_token_to_be_generated`.
    pub fn forced_bos(&self) -> Option<u32> {
        self.forced_bos_token_id
            .or(if self.force_bos_token_to_be_generated {
                self.bos_token_id
            } else {
                None
            })
    }

    /// Rows of the learned position tables (`max_position_embeddings + 2`).
    pub fn position_table_rows(&self) -> usize {
        self.max_position_embeddings + self.extra_pos_embeddings
    }

    /// A configuration with KoBART-v1's shapes and special token ids (`gogamza/kobart-base-v1`:
    /// 30000 tokens, 768 wide, 6+6 layers, 16 heads, 3072 FFN) for benchmarks and tests.
    pub fn kobart_v1_shapes() -> Self {
        let json = r#"{
            "model_type": "bart", "vocab_size": 30000, "max_position_embeddings": 1026,
            "d_model": 768, "encoder_layers": 6, "decoder_layers": 6,
            "encoder_attention_heads": 16, "decoder_attention_heads": 16,
            "encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072, "activation_function": "gelu",
            "dropout": 0.1, "attention_dropout": 0.0, "activation_dropout": 0.0,
            "scale_embedding": false, "pad_token_id": 3, "bos_token_id": 0, "eos_token_id": 1,
            "decoder_start_token_id": 1, "forced_eos_token_id": 1
        }"#;
        serde_json::from_str(json).expect("built-in KoBART config is valid")
    }
}

/// Deserializes a JSON config file's `text`; an error names `path` and the top-level field it
/// is about (where serde was when it failed, or the field a `duplicate field` error quotes), or
/// `-` when it concerns the whole text (not JSON, not an object).
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    let error = |field: String, message: String| Error::Config {
        path: path.to_path_buf(),
        field,
        message,
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = match e.path().iter().next() {
            // Text that is not JSON is about no field, wherever the parser stopped.
            _ if !e.inner().is_data() => "-".into(),
            Some(serde_path_to_error::Segment::Map { key }) => key.clone(),
            _ => quoted_field(&e.inner().to_string()).unwrap_or_else(|| "-".into()),
        };
        error(field, e.into_inner().to_string())
    })?;
    de.end().map_err(|e| error("-".into(), e.to_string()))?;
    Ok(value)
}

/// The field a serde message about the object itself quotes (`duplicate field `x``).
fn quoted_field(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("duplicate field `")
        .or_else(|| message.strip_prefix("missing field `"))?;
    rest.split_once('`').map(|(field, _)| field.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<BartConfig> {
        BartConfig::from_json_str(json, Path::new("config.json"))
    }

    #[test]
    fn defaults_are_transformers_defaults() {
        let c = parse("{}").unwrap();
        assert_eq!(c.vocab_size, 50265);
        assert_eq!(c.d_model, 1024);
        assert_eq!(c.eos_ids(), vec![2]);
        assert_eq!(c.decoder_start(), 2);
        assert_eq!(c.forced_eos_token_id, Some(2));
        assert_eq!(c.activation().unwrap(), Activation::Gelu);
        assert!(!c.pre_layer_norm());
    }

    #[test]
    fn unknown_fields_are_ignored_and_lists_accepted() {
        let c = parse(r#"{"author": "x", "kobart_version": 1.0, "eos_token_id": [1, 2]}"#).unwrap();
        assert_eq!(c.eos_ids(), vec![1, 2]);
    }

    #[test]
    fn unsupported_activation_names_the_field() {
        let err = parse(r#"{"activation_function": "mish"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("activation_function"), "{err}");
        assert!(err.contains("mish"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_field() {
        let err = parse(r#"{"d_model": "wide"}"#).unwrap_err().to_string();
        assert!(
            err.starts_with("config.json: field `d_model`: invalid type"),
            "{err}"
        );
    }

    /// Found by tests/fuzz_parsers.rs: the field was taken from the first backquoted word of
    /// serde's message, which for a bad number is the value (`field `-1``).
    #[test]
    fn errors_name_the_field_not_the_value() {
        for (json, field) in [
            (r#"{"d_model": -1}"#, "d_model"),
            (r#"{"max_length": 0.0}"#, "max_length"),
            (r#"{"vocab_size": 10, "model_type": 5}"#, "model_type"),
            (r#"{"eos_token_id": [1, -1]}"#, "eos_token_id"),
            (r#"{"d_model": 64, "d_model": 64}"#, "d_model"),
        ] {
            let err = parse(json).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("config.json: field `{field}`: ")),
                "{json}: {err}"
            );
        }
        // Text that is not JSON names no field, even when it stops inside one (`{"": ` named
        // the field ``).
        for json in [
            "",
            "{} x",
            "{\"d_model\": 1",
            "{\"\": ",
            "{\"d_model\": 6x}",
        ] {
            let err = parse(json).unwrap_err().to_string();
            assert!(err.starts_with("config.json: field `-`: "), "{json}: {err}");
        }
        let err = parse("[1]").unwrap_err().to_string();
        assert!(err.starts_with("config.json: field `-`: "), "{err}");
    }

    /// Found by tests/fuzz_parsers.rs: `usize::MAX` positions were accepted, and computing the
    /// position table's rows (`max_position_embeddings + 2`) when loading the model overflowed.
    #[test]
    fn positions_whose_table_cannot_exist_are_refused() {
        let err = parse(&format!(r#"{{"max_position_embeddings": {}}}"#, usize::MAX))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config.json: field `max_position_embeddings`: "),
            "{err}"
        );
        let c = parse(&format!(
            r#"{{"max_position_embeddings": {}}}"#,
            usize::MAX - 2
        ))
        .unwrap();
        assert_eq!(c.position_table_rows(), usize::MAX);
    }

    /// Found by tests/fuzz_parsers.rs: the vocabulary size was cut to 32 bits before token ids
    /// were compared with it, so `vocab_size` 2^32 refused every id ("outside the vocabulary of
    /// 0") and 2^32 + 1 accepted only id 0.
    #[test]
    fn token_ids_are_checked_against_the_whole_vocabulary_size() {
        for vocab in [1u64 << 32, (1 << 32) + 1, u64::MAX] {
            let c = parse(&format!(r#"{{"vocab_size": {vocab}, "pad_token_id": 3}}"#)).unwrap();
            assert_eq!(c.vocab_size as u64, vocab);
        }
        let err = parse(r#"{"vocab_size": 3, "pad_token_id": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config.json: field `pad_token_id`: ") && err.contains("vocab_size 3"),
            "{err}"
        );
    }

    /// Found by tests/fuzz_parsers.rs: `decoder_layers` 0 was accepted, the fixture model then
    /// loaded (its layers unused) and generation panicked indexing the first layer's cache.
    #[test]
    fn a_decoder_needs_a_layer() {
        let err = parse(r#"{"decoder_layers": 0}"#).unwrap_err().to_string();
        assert!(
            err.starts_with("config.json: field `decoder_layers`: "),
            "{err}"
        );
    }

    #[test]
    fn legacy_force_bos_maps_to_forced_bos() {
        let c = parse(r#"{"force_bos_token_to_be_generated": true, "bos_token_id": 0}"#).unwrap();
        assert_eq!(c.forced_bos(), Some(0));
    }

    #[test]
    fn mbart_is_pre_ln() {
        let c = parse(r#"{"model_type": "mbart"}"#).unwrap();
        assert!(c.pre_layer_norm() && c.final_layer_norm());
        let err = parse(r#"{"model_type": "t5"}"#).unwrap_err().to_string();
        assert!(err.contains("model_type"), "{err}");
    }

    #[test]
    fn heads_must_divide_width() {
        let err = parse(r#"{"d_model": 100, "encoder_attention_heads": 16}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("encoder_attention_heads"), "{err}");
    }
}
