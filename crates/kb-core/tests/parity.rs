//! Numerical parity with Hugging Face transformers (goldens from `scripts/make_fixtures.py`).
//!
//! Tolerances: f32 encoder states and logits within 1e-4 absolute; generated token ids identical;
//! beam scores within 1e-4; f16 logits within 0.05 and bf16 within 0.25 absolute of the f32 golden
//! (logits here span about ±20).

mod common;

use common::*;
use kb_core::candle_core::{DType, Tensor};
use kb_core::model::Pass;
use kb_core::KeywordModel;

const F32_TOL: f32 = 1e-4;

fn check_logits(model: &KeywordModel, prefix: &str, tol: f32) {
    let g = golden_tensors();
    let device = model.model.device().clone();
    let t = |n: &str| g[&format!("{prefix}.{n}")].to_device(&device).unwrap();
    let ids = t("input_ids").to_dtype(DType::U32).unwrap();
    let mask = t("attention_mask").to_dtype(DType::U32).unwrap();
    let dec = t("decoder_input_ids").to_dtype(DType::U32).unwrap();
    let dec_mask = t("decoder_attention_mask").to_dtype(DType::U32).unwrap();
    let enc = model
        .model
        .encode(&ids, Some(&mask), Pass::Inference)
        .unwrap();
    let d_enc = max_abs_diff(&enc, &t("encoder_hidden"));
    assert!(
        d_enc <= tol,
        "{prefix}: encoder states differ by {d_enc} (tolerance {tol})"
    );
    let logits = model
        .model
        .decode(&dec, &enc, Some(&mask), Some(&dec_mask), Pass::Inference)
        .unwrap();
    let d = max_abs_diff(&logits, &t("logits"));
    eprintln!(
        "{prefix} {:?}: encoder diff {d_enc:e}, logits diff {d:e}",
        model.model.dtype()
    );
    assert!(d <= tol, "{prefix}: logits differ by {d} (tolerance {tol})");
}

#[test]
fn safetensors_logits_match_transformers() {
    let m = KeywordModel::load_dir(&fixture("tiny-kobart"), DType::F32, &test_device()).unwrap();
    check_logits(&m, "bart", F32_TOL);
}

#[test]
fn pytorch_bin_logits_match_transformers() {
    let dir = copy_fixture("tiny-kobart", |f| f == "model.safetensors");
    let m = KeywordModel::load_dir(dir.path(), DType::F32, &test_device()).unwrap();
    check_logits(&m, "bart", F32_TOL);
}

#[test]
fn pre_layer_norm_mbart_logits_match_transformers() {
    let m = KeywordModel::load_dir(&fixture("tiny-mbart"), DType::F32, &test_device()).unwrap();
    check_logits(&m, "mbart", F32_TOL);
}

#[test]
fn half_precision_logits_are_within_bounds() {
    for (dtype, tol) in [(DType::F16, 0.05), (DType::BF16, 0.25)] {
        let m = KeywordModel::load_dir(&fixture("tiny-kobart"), dtype, &test_device()).unwrap();
        check_logits(&m, "bart", tol);
    }
}

#[test]
fn cached_incremental_decoding_equals_full_recomputation() {
    let m = KeywordModel::load_dir(&fixture("tiny-kobart"), DType::F32, &test_device()).unwrap();
    let g = golden_tensors();
    let t = |n: &str| g[n].to_device(m.model.device()).unwrap();
    let ids = t("bart.input_ids").to_dtype(DType::U32).unwrap();
    let mask = t("bart.attention_mask").to_dtype(DType::U32).unwrap();
    let dec = t("bart.decoder_input_ids").to_dtype(DType::U32).unwrap();
    let enc = m.model.encode(&ids, Some(&mask), Pass::Inference).unwrap();
    let full = m
        .model
        .decode(&dec, &enc, Some(&mask), None, Pass::Inference)
        .unwrap();
    let mut cache = m.model.start_decoding(&enc, Some(&mask)).unwrap();
    let steps = dec.dim(1).unwrap();
    // first two positions at once, then one at a time
    let mut parts = vec![m
        .model
        .decode_step(&dec.narrow(1, 0, 2).unwrap(), &mut cache)
        .unwrap()];
    for i in 2..steps {
        parts.push(
            m.model
                .decode_step(&dec.narrow(1, i, 1).unwrap(), &mut cache)
                .unwrap(),
        );
    }
    let inc = Tensor::cat(&parts, 1).unwrap();
    let d = max_abs_diff(&inc, &full);
    assert!(d <= 1e-5, "incremental decoding differs by {d}");
    assert_eq!(cache.past_len(), steps);
}
