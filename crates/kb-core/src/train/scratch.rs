//! From-scratch mode for machines without hub access: a KoBART-style tokenizer trained on the
//! training file, and a model configuration whose vocabulary matches it.

use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::normalizers::{BertNormalizer, Sequence, NFKC};
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{
    AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PreTokenizerWrapper,
};

use crate::config::BartConfig;
use crate::data::Example;
use crate::error::{Error, Result};

/// KoBART's special tokens, in KoBART's id order (`<s>`=0, `</s>`=1, `<pad>`=3, `<unk>`=5).
pub const KOBART_SPECIAL_TOKENS: [&str; 7] =
    ["<s>", "</s>", "<usr>", "<pad>", "<sys>", "<unk>", "<mask>"];

/// Trains a byte-pair-encoding tokenizer with KoBART's pipeline (NFKC + BERT-style cleaning,
/// Metaspace `▁` pre-tokenizer and decoder) and special tokens on the queries and keywords;
/// `alphabet` characters are in the vocabulary whether or not the examples use them.
pub fn train_tokenizer(
    examples: &[Example],
    vocab_size: usize,
    alphabet: &[char],
) -> Result<tokenizers::Tokenizer> {
    let bpe = BPE::builder()
        .unk_token("<unk>".to_string())
        .build()
        .map_err(|e| Error::Tokenizer(format!("cannot build BPE: {e}")))?;
    let mut tok = tokenizers::Tokenizer::new(ModelWrapper::BPE(bpe));
    tok.with_normalizer(Some(NormalizerWrapper::Sequence(Sequence::new(vec![
        NormalizerWrapper::NFKC(NFKC),
        NormalizerWrapper::BertNormalizer(BertNormalizer::new(false, false, Some(false), false)),
    ]))))
    .map_err(|e| Error::Tokenizer(format!("cannot set the normalizer: {e}")))?;
    let metaspace = Metaspace::new('▁', PrependScheme::Always, true);
    tok.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(metaspace.clone())));
    tok.with_decoder(Some(DecoderWrapper::Metaspace(metaspace)));
    let specials: Vec<AddedToken> = KOBART_SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer = tokenizers::models::TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .vocab_size(vocab_size)
            .min_frequency(2)
            .show_progress(false)
            .special_tokens(specials)
            .initial_alphabet(alphabet.iter().copied().collect())
            .build(),
    );
    let texts = examples
        .iter()
        .flat_map(|e| [e.query.clone(), e.keyword.clone()]);
    tok.train(&mut trainer, texts)
        .map_err(|e| Error::Tokenizer(format!("cannot train the tokenizer: {e}")))?;
    for (id, t) in KOBART_SPECIAL_TOKENS.iter().enumerate() {
        if tok.token_to_id(t) != Some(id as u32) {
            return Err(Error::Tokenizer(format!(
                "trained tokenizer put {t} at the wrong id"
            )));
        }
    }
    Ok(tok)
}

/// Reads the `config.json` of a model to build from scratch and fits it to `vocab_size` and
/// KoBART's special ids. Returns the validated config and the JSON to save with checkpoints.
pub fn scratch_config(path: &Path, vocab_size: usize) -> Result<(BartConfig, serde_json::Value)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        field: "-".into(),
        message: e.to_string(),
    })?;
    let obj = json.as_object_mut().ok_or_else(|| Error::Config {
        path: path.to_path_buf(),
        field: "-".into(),
        message: "expected a JSON object".into(),
    })?;
    obj.insert("vocab_size".into(), vocab_size.into());
    for (k, v) in [
        ("bos_token_id", 0),
        ("eos_token_id", 1),
        ("pad_token_id", 3),
        ("decoder_start_token_id", 1),
        ("forced_eos_token_id", 1),
    ] {
        obj.insert(k.into(), v.into());
    }
    obj.entry("model_type").or_insert("bart".into());
    obj.insert(
        "architectures".into(),
        serde_json::json!(["BartForConditionalGeneration"]),
    );
    let cfg = BartConfig::from_json_str(&json.to_string(), path)?;
    Ok((cfg, json))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trained_tokenizer_has_kobart_specials_and_roundtrips() {
        let ex: Vec<Example> = (0..50)
            .map(|i| Example {
                query: format!("이사화물 통관예약을 하면 뭐가 좋나요 {i}번?"),
                keyword: "이사화물, 통관, 예약, 장점".into(),
                line: i + 2,
            })
            .collect();
        let tok = train_tokenizer(&ex, 300, &[]).unwrap();
        assert_eq!(tok.token_to_id("<pad>"), Some(3));
        assert_eq!(tok.token_to_id("<unk>"), Some(5));
        let enc = tok.encode("이사화물, 통관", false).unwrap();
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), "이사화물, 통관");
    }
}
