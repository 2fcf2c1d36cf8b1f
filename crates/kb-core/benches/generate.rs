//! Generation speed at a real model's shapes: milliseconds per query for exactly 16 new tokens
//! (`KB_BENCH_NEW_TOKENS`), batch 1, greedy and beam 5, for each dtype (`KB_BENCH_DTYPES`,
//! default `f32,bf16`), weight quantization (`KB_BENCH_QUANTIZE`, default `none`; `int8` runs on
//! the CPU's int8 kernels) and key/value cache dtype (`KB_BENCH_KV_CACHE`, default the model's
//! dtype; e.g. `f32,f16,bf16`).
//!
//! ```text
//! KB_BENCH_MODEL=/tmp/kobart-random cargo bench -p kb-core --bench generate
//! KB_BENCH_MODEL=/tmp/kobart-random KB_BENCH_DTYPES=f32 KB_BENCH_QUANTIZE=none,int8 \
//!     KB_BENCH_KV_CACHE=f32,f16 KB_BENCH_BATCH=16 cargo bench -p kb-core --bench generate
//! ```
//! A KoBART-v1-shaped random model comes from `scripts/make_random_kobart.py` (torch) or, without
//! Python, `cargo run --release -p kb-core --example random_kobart -- /tmp/kobart-random`.
//! `scripts/bench_generate.py` runs this next to transformers on the same CPU and compares.
//! Prints one JSON object per measurement (`{"impl":"kb-core","dtype":…,"quantize":…,
//! "kv_cache":…,"beams":…,"ms_per_query":…}`); `KB_INT8_KERNEL` and `KB_F32_KERNEL` force the
//! product kernels.

use std::time::Instant;

use kb_core::candle_core::{DType, Device};
use kb_core::{generate, KeywordModel, LoadOptions, Quantization};

const QUERIES: [&str; 4] = [
    "이사화물 통관예약을 하면 뭐가 좋나요?",
    "해외직구 물품의 면세한도는 얼마인가요?",
    "개인통관고유부호는 어디서 발급받나요?",
    "여행자 휴대품 신고는 어떻게 하나요?",
];

/// The comma-separated list in variable `name`, or `default`.
fn list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

fn main() {
    kb_core::threads::fix_thread_count();
    let Ok(dir) = std::env::var("KB_BENCH_MODEL") else {
        eprintln!(
            "set KB_BENCH_MODEL to a model folder (from scripts/make_random_kobart.py, or \
             `cargo run --release -p kb-core --example random_kobart -- DIR`)"
        );
        return;
    };
    let reps = number("KB_BENCH_REPS", 3);
    let batch = number("KB_BENCH_BATCH", 1);
    let new_tokens = number("KB_BENCH_NEW_TOKENS", 16);
    let dtypes: Vec<DType> = list("KB_BENCH_DTYPES", "f32,bf16")
        .iter()
        .map(|d| kb_core::parse_dtype(d).expect("dtype"))
        .collect();
    let quantizations: Vec<Quantization> = list("KB_BENCH_QUANTIZE", "none")
        .iter()
        .map(|q| q.parse().expect("quantization"))
        .collect();
    // Empty: the model's dtype.
    let caches: Vec<Option<DType>> = {
        let l = list("KB_BENCH_KV_CACHE", "");
        if l.is_empty() {
            vec![None]
        } else {
            l.iter()
                .map(|d| Some(kb_core::parse_dtype(d).expect("cache dtype")))
                .collect()
        }
    };
    let name = |d: DType| format!("{d:?}").to_lowercase();
    for &dtype in &dtypes {
        for &quantization in &quantizations {
            for &cache in &caches {
                let options = LoadOptions {
                    dtype,
                    quantization,
                    kv_cache_dtype: cache,
                };
                let model =
                    KeywordModel::load_dir_with(std::path::Path::new(&dir), &options, &Device::Cpu)
                        .expect("load model");
                let cache = name(model.model.kv_cache_dtype());
                let tag = format!(
                    "\"impl\":\"kb-core\",\"dtype\":\"{}\",\"quantize\":\"{quantization}\",\"kv_cache\":\"{cache}\"",
                    name(dtype)
                );
                eprintln!(
                    "{{{tag},\"weight_matrices_mib\":{:.1}}}",
                    model.model.matrix_bytes() as f64 / 1048576.0
                );
                let inputs = model.encode_queries(&QUERIES, None).expect("encode");
                for beams in [1usize, 5] {
                    let mut cfg = model.generation.clone();
                    cfg.num_beams = beams;
                    cfg.max_length = new_tokens + 1; // decoder start + the new tokens
                    cfg.max_new_tokens = None;
                    // No early end: exactly that many decoder steps.
                    cfg.min_length = new_tokens + 1;
                    // warm-up
                    generate(&model.model, &inputs[..1], &cfg).expect("generate");
                    let start = Instant::now();
                    let mut n = 0;
                    for _ in 0..reps {
                        for q in &inputs {
                            let out = generate(&model.model, std::slice::from_ref(q), &cfg)
                                .expect("generate");
                            assert_eq!(out[0].ids.len(), new_tokens);
                            n += 1;
                        }
                    }
                    let ms = start.elapsed().as_secs_f64() * 1000.0 / n as f64;
                    println!("{{{tag},\"beams\":{beams},\"ms_per_query\":{ms:.1}}}");
                    if batch > 1 {
                        // One batched search over `batch` queries, as kb-serve runs them.
                        let many: Vec<_> = inputs.iter().cycle().take(batch).cloned().collect();
                        let start = Instant::now();
                        for _ in 0..reps {
                            generate(&model.model, &many, &cfg).expect("generate");
                        }
                        let ms = start.elapsed().as_secs_f64() * 1000.0 / reps as f64;
                        println!(
                            "{{{tag},\"beams\":{beams},\"batch\":{batch},\"ms_per_batch\":{ms:.1}}}"
                        );
                    }
                }
            }
        }
    }
}
