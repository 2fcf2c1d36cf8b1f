//! Quality guard of int8 inference: the same model extracts keywords with f32 weights, with int8
//! weights ([`Quantization::Int8`]) and with bf16 weights; int8 must change the keyword set of
//! no more rows than bf16 inference does (plus two rows in a hundred), and its micro F1 against
//! the gold keywords must stay within half a point of f32's.
//!
//! Why against bf16 and not a fixed share: how many rows any rounding changes depends on the
//! model — a small model trained for minutes has many near-ties between beams. On the
//! quickstart-sized model (vocabulary 6,000, 3+3 layers, 256 wide) on all of data/test.tsv, int8
//! kept 95.3% of the keyword sets, bf16 weights 95.8%, f16 weights 99.4%; micro F1 0.5866 (f32)
//! and 0.5854 (int8). The issue's aim of 98% is not met on such a model.
//!
//! By default the model is trained here, from scratch, on a slice of `data/train.tsv` (a small
//! BART, about a minute on 2 cores) and compared on `data/valid.tsv`. To run the guard on a
//! real model, as the README's figure was measured (the quickstart recipe's model on all of
//! `data/test.tsv`):
//!
//! ```text
//! KB_INT8_GUARD_MODEL=runs/quickstart/export KB_INT8_GUARD_DATA=data/test.tsv \
//!     cargo test --release -p kb-core --features train --test int8_quality -- --nocapture
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use kb_core::candle_core::{DType, Device};
use kb_core::data::Dataset;
use kb_core::eval::{evaluate, keyword_set, Matching};
use kb_core::train::{train, InitMode, RunOptions, TrainSettings};
use kb_core::{KeywordModel, LoadOptions, Quantization};

/// How many more rows (a share of all) int8 may change than bf16 weights do: about the sampling
/// noise of the difference on a few hundred rows where each changes ~5% of them (σ ≈ 1.5%).
const MARGIN_OVER_BF16: f64 = 0.02;
/// The largest micro-F1 difference allowed (half a point).
const MAX_F1_DIFFERENCE: f64 = 0.005;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The first `n` rows of `src` written to `dest` (with the header).
fn slice(src: &Path, n: usize, dest: &Path) {
    let text = std::fs::read_to_string(src).unwrap();
    let lines: Vec<&str> = text.lines().take(n + 1).collect();
    std::fs::write(dest, lines.join("\n") + "\n").unwrap();
}

/// A small BART (d_model 128, 2+2 layers): big enough to learn real keywords in a minute.
const SMALL_MODEL: &str = r#"{"model_type": "bart", "d_model": 128, "encoder_layers": 2,
    "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "encoder_ffn_dim": 512, "decoder_ffn_dim": 512, "max_position_embeddings": 64,
    "activation_function": "gelu", "dropout": 0.1, "attention_dropout": 0.0,
    "activation_dropout": 0.0, "init_std": 0.05, "scale_embedding": false, "vocab_size": 2000,
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 3, "decoder_start_token_id": 1,
    "forced_eos_token_id": 1}"#;

/// Trains [`SMALL_MODEL`] in `dir`; returns its best checkpoint.
fn train_small_model(dir: &Path) -> PathBuf {
    slice(
        &root().join("data/train.tsv"),
        TRAIN_ROWS,
        &dir.join("train.tsv"),
    );
    slice(&root().join("data/valid.tsv"), 64, &dir.join("val.tsv"));
    std::fs::write(dir.join("model.json"), SMALL_MODEL).unwrap();
    let run = dir.join("run");
    let settings = TrainSettings {
        init: InitMode::Scratch,
        model_config: Some(dir.join("model.json")),
        tokenizer_vocab_size: 2000,
        train_file: dir.join("train.tsv"),
        test_file: dir.join("val.tsv"),
        checkpoint: run.clone(),
        max_epochs: EPOCHS,
        batch_size: 32,
        max_len: 48,
        lr: 3e-3,
        num_workers: 1,
        save_top_k: 1,
        ..Default::default()
    };
    let outcome = train(&settings, &RunOptions::default()).unwrap();
    eprintln!("trained: val_loss {:?}", outcome.val_loss);
    run.join("model_chp").join(&outcome.best[0].name)
}

/// Rows of the small model's training slice, and its epochs.
const TRAIN_ROWS: usize = 3000;
const EPOCHS: usize = 8;
/// Validation rows the small model is compared on.
const COMPARED_ROWS: usize = 400;

/// The keywords `model` extracts for `queries` (beam search with the folder's settings).
fn extract(model: &KeywordModel, queries: &[&str]) -> Vec<Vec<String>> {
    let mut config = model.generation.clone();
    config.max_length = config.max_length.min(48);
    model
        .extract_all(queries, &config, None, 32, |_| {})
        .unwrap()
        .into_iter()
        .map(|e| e.keywords)
        .collect()
}

#[test]
fn int8_keywords_agree_with_f32() {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    // Relative paths are taken from the workspace root (tests run in the crate's folder).
    let given = std::env::var_os("KB_INT8_GUARD_MODEL").map(|p| root().join(p));
    let (model_dir, data, rows) = match &given {
        Some(model) => {
            let data = std::env::var_os("KB_INT8_GUARD_DATA")
                .map(|p| root().join(p))
                .unwrap_or_else(|| root().join("data/test.tsv"));
            (model.clone(), data, usize::MAX)
        }
        None => (
            train_small_model(tmp.path()),
            root().join("data/valid.tsv"),
            COMPARED_ROWS,
        ),
    };
    let examples = Dataset::read_tsv(&data, false).unwrap().examples;
    let examples = &examples[..examples.len().min(rows)];
    assert!(examples.len() >= 300, "{}: too few rows", data.display());
    let queries: Vec<&str> = examples.iter().map(|r| r.query.as_str()).collect();
    let gold: Vec<Vec<String>> = examples
        .iter()
        .map(|r| r.keyword.split(',').map(|k| k.trim().to_string()).collect())
        .collect();

    let load = |dtype, quantization| {
        let options = LoadOptions {
            quantization,
            ..LoadOptions::new(dtype)
        };
        KeywordModel::load_dir_with(&model_dir, &options, &Device::Cpu).unwrap()
    };
    let f32_keywords = extract(&load(DType::F32, Quantization::None), &queries);
    let int8_keywords = extract(&load(DType::F32, Quantization::Int8), &queries);
    let bf16_keywords = extract(&load(DType::BF16, Quantization::None), &queries);

    let matching = Matching::default();
    let kept = |other: &[Vec<String>], name: &str| {
        let mut same = 0;
        for (i, (a, b)) in f32_keywords.iter().zip(other).enumerate() {
            if keyword_set(a, &matching) == keyword_set(b, &matching) {
                same += 1;
            } else if name == "int8" {
                eprintln!("differs: {:?}\n  f32  {a:?}\n  int8 {b:?}", queries[i]);
            }
        }
        same as f64 / queries.len() as f64
    };
    let (int8_kept, bf16_kept) = (kept(&int8_keywords, "int8"), kept(&bf16_keywords, "bf16"));
    let f1 = |predicted: &[Vec<String>]| {
        let rows = gold
            .iter()
            .zip(predicted)
            .map(|(g, p)| (g.as_slice(), p.as_slice()));
        evaluate(rows, &matching).1.micro.f1
    };
    let (f1_f32, f1_int8) = (f1(&f32_keywords), f1(&int8_keywords));
    eprintln!(
        "{} ({} rows of {}): keyword sets kept by int8 {:.1}%, by bf16 weights {:.1}%; micro F1 \
         f32 {f1_f32:.4} int8 {f1_int8:.4}; {:.0} s",
        model_dir.display(),
        queries.len(),
        data.display(),
        100.0 * int8_kept,
        100.0 * bf16_kept,
        started.elapsed().as_secs_f64()
    );
    // A model that learned nothing would agree trivially.
    assert!(
        f1_f32 >= 0.3,
        "the compared model is too weak: micro F1 {f1_f32}"
    );
    assert!(
        int8_kept >= bf16_kept - MARGIN_OVER_BF16,
        "int8 kept {int8_kept} of the keyword sets, bf16 weights {bf16_kept}"
    );
    assert!(
        (f1_f32 - f1_int8).abs() <= MAX_F1_DIFFERENCE,
        "micro F1 f32 {f1_f32} vs int8 {f1_int8}"
    );
}
