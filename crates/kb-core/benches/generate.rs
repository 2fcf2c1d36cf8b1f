//! Generation speed at a real model's shapes: milliseconds per query for exactly 16 new tokens
//! (`KB_BENCH_NEW_TOKENS`), batch 1, greedy and beam 5, in f32 and bf16.
//!
//! ```text
//! KB_BENCH_MODEL=/tmp/kobart-random cargo bench -p kb-core --bench generate
//! ```
//! `scripts/bench_generate.py` runs this next to transformers on the same CPU and compares.
//! Prints one JSON object per measurement (`{"impl":"kb-core","dtype":…,"beams":…,"ms_per_query":…}`).

use std::time::Instant;

use kb_core::candle_core::{DType, Device};
use kb_core::{generate, KeywordModel};

const QUERIES: [&str; 4] = [
    "이사화물 통관예약을 하면 뭐가 좋나요?",
    "해외직구 물품의 면세한도는 얼마인가요?",
    "개인통관고유부호는 어디서 발급받나요?",
    "여행자 휴대품 신고는 어떻게 하나요?",
];

fn main() {
    kb_core::threads::fix_thread_count();
    let Ok(dir) = std::env::var("KB_BENCH_MODEL") else {
        eprintln!("set KB_BENCH_MODEL to a model folder (e.g. from scripts/make_random_kobart.py)");
        return;
    };
    let reps: usize = std::env::var("KB_BENCH_REPS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let dtypes: Vec<DType> = std::env::var("KB_BENCH_DTYPES")
        .unwrap_or_else(|_| "f32,bf16".into())
        .split(',')
        .map(|d| kb_core::parse_dtype(d).expect("dtype"))
        .collect();
    let batch: usize = std::env::var("KB_BENCH_BATCH")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1);
    let new_tokens: usize = std::env::var("KB_BENCH_NEW_TOKENS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(16);
    for dtype in dtypes {
        let model = KeywordModel::load_dir(std::path::Path::new(&dir), dtype, &Device::Cpu)
            .expect("load model");
        let inputs = model.encode_queries(&QUERIES, None).expect("encode");
        for beams in [1usize, 5] {
            let mut cfg = model.generation.clone();
            cfg.num_beams = beams;
            cfg.max_length = new_tokens + 1; // decoder start + the new tokens
            cfg.max_new_tokens = None;
            cfg.min_length = new_tokens + 1; // no early end: exactly that many decoder steps
                                             // warm-up
            generate(&model.model, &inputs[..1], &cfg).expect("generate");
            let start = Instant::now();
            let mut n = 0;
            for _ in 0..reps {
                for q in &inputs {
                    let out =
                        generate(&model.model, std::slice::from_ref(q), &cfg).expect("generate");
                    assert_eq!(out[0].ids.len(), new_tokens);
                    n += 1;
                }
            }
            let ms = start.elapsed().as_secs_f64() * 1000.0 / n as f64;
            println!(
                "{{\"impl\":\"kb-core\",\"dtype\":\"{}\",\"beams\":{beams},\"ms_per_query\":{ms:.1}}}",
                format!("{dtype:?}").to_lowercase()
            );
            if batch > 1 {
                // One batched search over `batch` queries, as kb-serve runs them.
                let many: Vec<_> = inputs.iter().cycle().take(batch).cloned().collect();
                let start = Instant::now();
                for _ in 0..reps {
                    generate(&model.model, &many, &cfg).expect("generate");
                }
                let ms = start.elapsed().as_secs_f64() * 1000.0 / reps as f64;
                println!(
                    "{{\"impl\":\"kb-core\",\"dtype\":\"{}\",\"beams\":{beams},\"batch\":{batch},\"ms_per_batch\":{ms:.1}}}",
                    format!("{dtype:?}").to_lowercase()
                );
            }
        }
    }
}
