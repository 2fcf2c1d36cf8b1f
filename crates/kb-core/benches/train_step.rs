//! Training speed at a real model's shapes: one optimizer step (forward, backward, clipping,
//! AdamW) on a batch of 8 customs questions, and an epoch over the sample data (extrapolated
//! from an evenly spaced sample of its batches).
//!
//! ```text
//! KB_BENCH_MODEL=/tmp/kobart-random cargo bench -p kb-core --features train --bench train_step
//! ```
//! `KB_BENCH_DEVICE=cuda:0` (CUDA build), `KB_BENCH_BATCH=N`, `KB_BENCH_PRECISION=bf16`
//! choose the device, batch size and mixed precision. `KB_BENCH_PHASES=1` also prints the time of each phase of every step.
//! `scripts/bench_train.py` runs this next to PyTorch on the same CPU and compares.
//! Prints JSON objects (`{"impl":"kb-core","what":"step",…}`).

use std::path::Path;
use std::time::Instant;

use kb_core::candle_core::DType;
use kb_core::data::{encode_examples, epoch_batches, Batch, Dataset, Encoded};
use kb_core::model::{DropoutRng, Pass};
use kb_core::train::{clip_coefficient, AdamW, AdamWConfig, Trainable};
use kb_core::weights::{load_checked, WeightFiles};
use kb_core::{BartConfig, KoTokenizer};

fn main() {
    kb_core::threads::fix_thread_count();
    let Ok(dir) = std::env::var("KB_BENCH_MODEL") else {
        eprintln!("set KB_BENCH_MODEL to a model folder (e.g. from scripts/make_random_kobart.py)");
        return;
    };
    let steps: usize = std::env::var("KB_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let epoch = std::env::var("KB_BENCH_EPOCH")
        .map(|v| v == "1")
        .unwrap_or(false);
    // As kb-train does.
    kb_core::allocator::retain_freed_memory();
    let phases = std::env::var("KB_BENCH_PHASES").is_ok_and(|v| v == "1");
    let dir = Path::new(&dir);
    let device =
        kb_core::parse_device(&std::env::var("KB_BENCH_DEVICE").unwrap_or_else(|_| "cpu".into()))
            .unwrap();
    let batch_size: usize = std::env::var("KB_BENCH_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let bf16 = std::env::var("KB_BENCH_PRECISION").is_ok_and(|v| v == "bf16");
    let cfg = BartConfig::from_file(&dir.join("config.json")).unwrap();
    let tok = KoTokenizer::from_model_dir(dir, &cfg).unwrap();
    let (tensors, _) =
        load_checked(&WeightFiles::find(dir).unwrap(), &cfg, DType::F32, &device).unwrap();
    let mut model = Trainable::from_tensors(&cfg, tensors, &device).unwrap();
    if bf16 {
        model.set_compute_dtype(&cfg, DType::BF16).unwrap();
    }
    let mut opt = AdamW::new(model.parameters(), AdamWConfig::default()).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let data = Dataset::read_tsv(&root.join("data/train.tsv"), false).unwrap();
    let encoded = encode_examples(&tok, &data.examples, 512).unwrap();
    let step = |items: &[&Encoded], opt: &mut AdamW, seed: u64| -> usize {
        let batch = Batch::build(items, tok.special().pad, &device).unwrap();
        let rng = DropoutRng::new(seed);
        let t0 = Instant::now();
        let loss = model
            .loss(
                &batch,
                Pass::Training {
                    dropout: Some(&rng),
                },
            )
            .unwrap();
        let t1 = Instant::now();
        let grads = model.gradients(&loss).unwrap();
        let t2 = Instant::now();
        let (coef, _) = clip_coefficient(&grads, 1.0).unwrap();
        let t3 = Instant::now();
        opt.step_scaled(&grads, 3e-5, coef).unwrap();
        model.sync_compute_copy().unwrap();
        device.synchronize().unwrap();
        let t4 = Instant::now();
        if phases {
            let strided: usize = grads
                .values()
                .filter(|g| !g.is_contiguous())
                .map(|g| g.elem_count())
                .sum();
            eprintln!("non-contiguous gradient elements: {strided}");
            let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1000.0;
            eprintln!(
                "phases: forward {:.0} ms, backward {:.0} ms, clip {:.0} ms, adamw {:.0} ms",
                ms(t0, t1),
                ms(t1, t2),
                ms(t2, t3),
                ms(t3, t4)
            );
        }
        batch.tokens
    };
    // The first rows (8 by default), as PyTorch's side uses.
    let first: Vec<&Encoded> = encoded.iter().take(batch_size).collect();
    // Two warm-up steps (the same as PyTorch's side): the first ones grow the heap and touch the
    // optimizer's moments for the first time; steady-state steps are what a run is made of.
    for i in 0..2 {
        step(&first, &mut opt, 1000 + i);
    }
    let start = Instant::now();
    let mut tokens = 0;
    for i in 0..steps {
        tokens += step(&first, &mut opt, i as u64 + 1);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"impl\":\"kb-core\",\"what\":\"step\",\"device\":\"{:?}\",\"batch\":{batch_size},\"bf16\":{bf16},\"ms_per_step\":{:.1},\"tokens_per_s\":{:.1}}}",
        device,
        secs * 1000.0 / steps as f64,
        tokens as f64 / secs
    );
    if epoch {
        // An epoch over data/train.tsv as kb-train runs it (batches padded to their longest row,
        // length bucketing), timed on an evenly spaced sample of its batches and extrapolated.
        let lengths: Vec<usize> = encoded
            .iter()
            .map(|e| e.input_ids.len() + e.labels.len())
            .collect();
        let plan = epoch_batches(&lengths, 8, 42, 0, true);
        let sample: usize = std::env::var("KB_BENCH_EPOCH_SAMPLE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        let stride = (plan.len() / sample.max(1)).max(1);
        let picked: Vec<&Vec<usize>> = plan.iter().step_by(stride).collect();
        let start = Instant::now();
        for (i, b) in picked.iter().enumerate() {
            let items: Vec<&Encoded> = b.iter().map(|&j| &encoded[j]).collect();
            step(&items, &mut opt, 1000 + i as u64);
        }
        let per = start.elapsed().as_secs_f64() / picked.len() as f64;
        println!(
            "{{\"impl\":\"kb-core\",\"what\":\"epoch\",\"rows\":{},\"batches\":{},\"seconds\":{:.1},\"ms_per_step\":{:.1},\"extrapolated_from_steps\":{}}}",
            encoded.len(),
            plan.len(),
            per * plan.len() as f64,
            per * 1000.0,
            picked.len()
        );
    }
}
