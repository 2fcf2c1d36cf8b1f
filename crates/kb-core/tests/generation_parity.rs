//! `generate()` parity: every golden generation of `scripts/make_fixtures.py` (greedy and beam
//! search with max_length / max_new_tokens, min_length, no_repeat_ngram_size, length_penalty and
//! each early_stopping mode, on a padded batch of five inputs) must give identical token ids, and
//! beam scores within 1e-4 of transformers' `sequences_scores`.

mod common;

use common::*;
use kb_core::candle_core::DType;
use kb_core::generation::EarlyStopping;
use kb_core::{generate, KeywordModel, LoadOptions, Quantization};
use serde_json::Value;

fn settings(model: &KeywordModel, case: &Value) -> kb_core::GenerationConfig {
    let mut g = model.generation.clone();
    g.num_beams = case["num_beams"].as_u64().unwrap() as usize;
    if let Some(v) = case.get("max_length") {
        g.max_length = v.as_u64().unwrap() as usize;
    }
    g.max_new_tokens = case
        .get("max_new_tokens")
        .map(|v| v.as_u64().unwrap() as usize);
    g.min_length = case
        .get("min_length")
        .map(|v| v.as_u64().unwrap() as usize)
        .unwrap_or(0);
    g.no_repeat_ngram_size = case
        .get("no_repeat_ngram_size")
        .map(|v| v.as_u64().unwrap() as usize)
        .unwrap_or(0);
    g.length_penalty = case
        .get("length_penalty")
        .map(|v| v.as_f64().unwrap())
        .unwrap_or(1.0);
    g.early_stopping = case
        .get("early_stopping")
        .map(|v| EarlyStopping::from_json(v).unwrap())
        .unwrap_or_default();
    g
}

/// The tiny fixture model, transformers' golden generations and their input ids.
fn load_golden() -> (KeywordModel, Value, Vec<Vec<u32>>) {
    let model =
        KeywordModel::load_dir(&fixture("tiny-kobart"), DType::F32, &test_device()).unwrap();
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("golden/generation.json")).unwrap())
            .unwrap();
    let inputs: Vec<Vec<u32>> = serde_json::from_value(golden["input_ids"].clone()).unwrap();
    (model, golden, inputs)
}

#[test]
fn generations_match_transformers_exactly() {
    let (model, golden, inputs) = load_golden();
    // The tokenizer must reproduce transformers' input ids too.
    let queries: Vec<&str> = golden["queries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q.as_str().unwrap())
        .collect();
    assert_eq!(model.encode_queries(&queries, None).unwrap(), inputs);

    let mut checked = 0;
    for case in golden["cases"].as_array().unwrap() {
        let name = case["case"]["name"].as_str().unwrap();
        let cfg = settings(&model, &case["case"]);
        let out = generate(&model.model, &inputs, &cfg).unwrap();
        for (i, (got, want)) in out
            .iter()
            .zip(case["outputs"].as_array().unwrap())
            .enumerate()
        {
            let want_ids: Vec<u32> = want["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(
                got.ids, want_ids,
                "case {name}, input {i}: token ids differ"
            );
            match (got.score, want["score"].as_f64()) {
                (Some(s), Some(w)) => assert!(
                    (s as f64 - w).abs() < 1e-4,
                    "case {name}, input {i}: score {s} vs transformers {w}"
                ),
                (None, None) => {}
                other => panic!("case {name}, input {i}: score presence differs: {other:?}"),
            }
            let text = model.tokenizer.decode(&got.ids).unwrap();
            assert_eq!(
                text,
                want["text"].as_str().unwrap(),
                "case {name}, input {i}: decoded text"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 45, "every golden output was compared");
}

#[test]
fn single_input_equals_its_row_in_a_batch() {
    let model =
        KeywordModel::load_dir(&fixture("tiny-kobart"), DType::F32, &test_device()).unwrap();
    let mut cfg = model.generation.clone();
    cfg.num_beams = 5;
    cfg.max_length = 20;
    let queries = [
        "해외직구 면세한도는 얼마인가요?",
        "관세 환급",
        "이사화물 통관예약을 하면 뭐가 좋나요?",
    ];
    let batch = model.extract(&queries, &cfg, None).unwrap();
    for (q, b) in queries.iter().zip(&batch) {
        let single = model.extract(&[q], &cfg, None).unwrap();
        assert_eq!(single[0].ids, b.ids, "{q}");
    }
}

#[test]
fn outputs_are_reported_as_inputs_finish() {
    let (model, golden, inputs) = load_golden();
    for case in golden["cases"].as_array().unwrap() {
        let cfg = settings(&model, &case["case"]);
        let name = case["case"]["name"].as_str().unwrap();
        let mut order = Vec::new();
        kb_core::generate_each(&model.model, &inputs, &cfg, &mut |i, g| order.push((i, g)))
            .unwrap();
        let mut reported: Vec<usize> = order.iter().map(|(i, _)| *i).collect();
        reported.sort_unstable();
        assert_eq!(
            reported,
            (0..inputs.len()).collect::<Vec<_>>(),
            "{name}: each once"
        );
        let batch = generate(&model.model, &inputs, &cfg).unwrap();
        for (i, g) in &order {
            assert_eq!(g, &batch[*i], "{name}: input {i}");
        }
        if cfg.num_beams == 1 {
            // Greedy inputs finish at their eos: reported in order of length.
            let lens: Vec<usize> = order.iter().map(|(_, g)| g.ids.len()).collect();
            assert!(lens.windows(2).all(|w| w[0] <= w[1]), "{name}: {lens:?}");
        }
    }
    // At least one case reports an input before the last step (the golden set has one-token
    // answers next to long ones).
    let cfg = settings(&model, &golden["cases"][0]["case"]);
    let mut first = None;
    kb_core::generate_each(&model.model, &inputs, &cfg, &mut |_, g| {
        first.get_or_insert(g.ids.len());
    })
    .unwrap();
    assert_eq!(first, Some(1), "the one-token answer comes first");
}

#[test]
fn inputs_no_longer_wanted_leave_without_changing_the_others() {
    let (model, golden, inputs) = load_golden();
    let mut dropped = 0;
    for case in golden["cases"].as_array().unwrap() {
        let cfg = settings(&model, &case["case"]);
        let name = case["case"]["name"].as_str().unwrap();
        let full = generate(&model.model, &inputs, &cfg).unwrap();
        // Odd inputs are given up after about two steps (two questions per active input).
        let asked = std::cell::Cell::new(0usize);
        let wanted = |i: usize| {
            asked.set(asked.get() + 1);
            i.is_multiple_of(2) || asked.get() <= 2 * inputs.len()
        };
        let mut reported = Vec::new();
        kb_core::generate_each_while(
            &model.model,
            &inputs,
            &cfg,
            &mut |i, g| reported.push((i, g)),
            &wanted,
        )
        .unwrap();
        for (i, g) in &reported {
            assert_eq!(g, &full[*i], "{name}: input {i}");
        }
        let mut even: Vec<usize> = reported
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| i % 2 == 0)
            .collect();
        even.sort_unstable();
        assert_eq!(
            even,
            (0..inputs.len()).filter(|i| i % 2 == 0).collect::<Vec<_>>(),
            "{name}: every wanted input is reported once"
        );
        dropped += inputs.len() - reported.len();
        // An odd input is reported only if it finished before it was given up.
        for (i, g) in reported.iter().filter(|(i, _)| i % 2 == 1) {
            assert!(
                g.ids.len() <= 3,
                "{name}: input {i} reported after it was given up"
            );
        }
    }
    assert!(dropped > 0, "no input was dropped: the test proves nothing");
}

/// Generates every golden case with `model`; returns (identical outputs, total, largest beam
/// score difference on identical outputs).
fn agreement(model: &KeywordModel, golden: &Value, inputs: &[Vec<u32>]) -> (usize, usize, f64) {
    let (mut same, mut total, mut score_diff) = (0, 0, 0f64);
    for case in golden["cases"].as_array().unwrap() {
        let name = case["case"]["name"].as_str().unwrap();
        let cfg = settings(model, &case["case"]);
        let out = generate(&model.model, inputs, &cfg).unwrap();
        let mut line = String::new();
        for (got, want) in out.iter().zip(case["outputs"].as_array().unwrap()) {
            let want_ids: Vec<u32> = serde_json::from_value(want["ids"].clone()).unwrap();
            total += 1;
            if got.ids == want_ids {
                same += 1;
                line.push('=');
                if let (Some(s), Some(w)) = (got.score, want["score"].as_f64()) {
                    score_diff = score_diff.max((s as f64 - w).abs());
                }
            } else {
                line.push('x');
            }
        }
        eprintln!("  {name}: {line}");
    }
    (same, total, score_diff)
}

#[test]
fn quantized_and_half_cache_generations_stay_close() {
    let (_, golden, inputs) = load_golden();
    for (q, cache) in [
        (Quantization::None, Some(DType::F16)),
        (Quantization::None, Some(DType::BF16)),
        (Quantization::Int8, None),
        (Quantization::Int8, Some(DType::F16)),
    ] {
        let options = LoadOptions {
            quantization: q,
            kv_cache_dtype: cache,
            ..LoadOptions::new(DType::F32)
        };
        let model = KeywordModel::load_dir_with(
            &fixture("tiny-kobart"),
            &options,
            &kb_core::candle_core::Device::Cpu,
        )
        .unwrap();
        let (same, total, sd) = agreement(&model, &golden, &inputs);
        eprintln!("{q} cache {cache:?}: {same}/{total} identical, score diff {sd:e}");
        // Measured: f16 cache 45/45 identical (scores within 6.8e-4), bf16 cache 44/45
        // (4.6e-3), int8 38/45 and 39/45 with an f16 cache (3.9e-2). The fixture's random
        // weights leave near-ties between beams that any rounding can flip.
        let (min_same, max_diff) = match (q, cache) {
            (Quantization::None, Some(DType::F16)) => (total, 2e-3),
            (Quantization::None, _) => (total - 2, 1e-2),
            _ => (total * 3 / 4, 8e-2),
        };
        assert!(
            same >= min_same && sd <= max_diff,
            "{q} cache {cache:?}: {same}/{total} identical, score diff {sd}"
        );
    }
}
