//! Grounded decoding on the tiny KoBART fixture (random weights, so free decoding invents text):
//! with the constraint, every generated keyword is a span of its question (whitespace ignored)
//! or a derived term, for greedy and beam search, in batches; the constraint works inside the
//! search (the scores it leaves are those of free decoding for the allowed tokens).

mod common;

use std::sync::Arc;

use kb_core::candle_core::{DType, Device};
use kb_core::generation::grounding::is_grounded;
use kb_core::generation::{DerivedTerms, Grounding};
use kb_core::keywords::split_keywords;
use kb_core::KeywordModel;

const QUERIES: [&str; 5] = [
    "이사화물 통관예약을 하면 뭐가 좋나요?",
    "해외직구 면세한도는 얼마인가요?",
    "여행자휴대품신고 어떻게 해요",
    "amazon에서 $150 신발 샀는데 관세 붙어요?",
    "세종대왕이 훈민정음을 창제한 이유는 무엇인가요?",
];

fn terms() -> DerivedTerms {
    DerivedTerms {
        terms: ["방법", "가능 여부", "필요 여부", "구매", "반입", "미신고"]
            .iter()
            .map(|t| (t.to_string(), 10))
            .collect(),
    }
}

fn model() -> KeywordModel {
    KeywordModel::load_dir(&common::fixture("tiny-kobart"), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn every_generated_keyword_is_grounded() {
    let model = model();
    let derived = terms();
    let grounding = Arc::new(Grounding::new(&model.tokenizer, &derived));
    let mut ungrounded_free = 0;
    for num_beams in [1, 3] {
        let mut free = model.generation.clone();
        free.num_beams = num_beams;
        free.max_length = 24;
        free.min_length = 0;
        let grounded = kb_core::GenerationConfig {
            grounding: Some(grounding.clone()),
            ..free.clone()
        };
        let out = model.extract(&QUERIES, &grounded, None).unwrap();
        for (q, r) in QUERIES.iter().zip(&out) {
            for k in &r.keywords {
                assert!(
                    is_grounded(k, q, &derived),
                    "beams {num_beams}: `{k}` of {:?} is not grounded in {q}",
                    r.text
                );
            }
        }
        // The same queries one at a time give the same outputs (the constraint is per input).
        for (q, r) in QUERIES.iter().zip(&out) {
            let alone = model.extract(&[q], &grounded, None).unwrap();
            assert_eq!(alone[0].ids, r.ids, "beams {num_beams}, {q}");
        }
        let out_free = model.extract(&QUERIES, &free, None).unwrap();
        for (q, r) in QUERIES.iter().zip(&out_free) {
            ungrounded_free += split_keywords(&r.text)
                .iter()
                .filter(|k| !is_grounded(k, q, &derived))
                .count();
        }
    }
    assert!(
        ungrounded_free > 0,
        "free decoding of a random model should invent text, or this test proves nothing"
    );
}

#[test]
fn allowed_tokens_follow_spans_separators_and_terms() {
    let model = model();
    let derived = terms();
    let g = Grounding::new(&model.tokenizer, &derived);
    let tok = &model.tokenizer;
    let eos = tok.special().eos[0];
    let input = g.input_text(&tok.encode("이사화물 통관예약을 하면 뭐가 좋나요?").unwrap());
    // Text the constraint must accept token by token, and text it must refuse somewhere.
    let accepts = |text: &str| -> bool {
        let ids = tok.encode(text).unwrap();
        (0..ids.len()).all(|i| g.allowed(&input, &ids[..i]).contains(&ids[i]))
    };
    assert!(
        !accepts("이사화물, 통관, 예약, 장점"),
        "장점 is not a listed term here"
    );
    assert!(accepts("이사화물, 통관예약, 방법"));
    assert!(
        accepts("이사 화물,통관"),
        "whitespace inside a keyword is ignored"
    );
    assert!(
        !accepts("관세, 통관"),
        "관세 is neither in the question nor a term"
    );
    // End of sequence: after a complete keyword, not after a dangling separator or a partial
    // derived term.
    let after = |text: &str| g.allowed(&input, &tok.encode(text).unwrap());
    assert!(after("이사화물").contains(&eos));
    assert!(!after("이사화물,").contains(&eos));
    assert!(after("").contains(&eos), "an empty answer stays possible");
}

/// Found by tests/fuzz_parsers.rs: building the constraint stored every prefix of every
/// derived term, memory quadratic in a term's length (a 100,000-character term: about 15 GB).
/// Terms sharing prefixes still continue and end where they should.
#[test]
fn long_and_overlapping_derived_terms() {
    let model = model();
    let tok = &model.tokenizer;
    let long: String = "가능".chars().cycle().take(100_000).collect();
    let derived = DerivedTerms {
        terms: [long.as_str(), "가능 여부", "가능", "필요 여부"]
            .iter()
            .map(|t| (t.to_string(), 1))
            .collect(),
    };
    let g = Grounding::new(tok, &derived);
    let input = g.input_text(&tok.encode("이사화물 통관").unwrap());
    let accepts = |text: &str| -> bool {
        let ids = tok.encode(text).unwrap();
        (0..ids.len()).all(|i| g.allowed(&input, &ids[..i]).contains(&ids[i]))
    };
    let eos = tok.special().eos[0];
    let after = |text: &str| g.allowed(&input, &tok.encode(text).unwrap());
    assert!(accepts("가능 여부, 가능, 필요 여부, 가능가능가능"));
    assert!(after("가능").contains(&eos), "가능 is a whole term");
    assert!(
        !after("가능가능").contains(&eos),
        "a prefix of the long term only"
    );
    assert!(!after("필요").contains(&eos), "a prefix of 필요 여부 only");
    assert!(!accepts("필요 가능"), "no term starts 필요가능");
}

#[test]
fn derived_terms_come_from_labels_and_round_trip() {
    let rows: Vec<(String, Vec<String>)> = vec![
        ("신발 샀어요".into(), vec!["신발".into(), "구매".into()]),
        ("가방 산 거".into(), vec!["가방".into(), "구매".into()]),
        ("신고 안 했어요".into(), vec!["미신고".into()]),
        ("가능한가요 여부".into(), vec!["가능 여부".into()]),
    ];
    let terms = DerivedTerms::from_labels(rows.iter().map(|(q, k)| (q.as_str(), k.as_slice())), 1);
    assert_eq!(terms.terms[0], ("구매".to_string(), 2));
    assert!(terms.terms.iter().any(|(t, _)| t == "미신고"));
    let at_least_two =
        DerivedTerms::from_labels(rows.iter().map(|(q, k)| (q.as_str(), k.as_slice())), 2);
    assert_eq!(at_least_two.terms, vec![("구매".to_string(), 2)]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("terms.tsv");
    terms.write(&path).unwrap();
    assert_eq!(DerivedTerms::read(&path).unwrap(), terms);
    std::fs::write(&path, "term\tcount\n방법\tx\n").unwrap();
    let e = DerivedTerms::read(&path).unwrap_err().to_string();
    assert!(
        e.contains("terms.tsv: line 2") && e.contains("count"),
        "{e}"
    );
}
