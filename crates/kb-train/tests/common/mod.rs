//! Helpers shared by kb-train's end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A temporary folder with the first `n_train`/`n_test` rows of data/ as `train.tsv` and
/// `test.tsv` (validation rows from data/valid.tsv), and `model_json` as `model.json`.
pub fn workspace(n_train: usize, n_test: usize, model_json: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let slice = |src: &str, n: usize, dest: &str| {
        let text = std::fs::read_to_string(root().join(src)).unwrap();
        let lines: Vec<&str> = text.lines().take(n + 1).collect();
        std::fs::write(dir.path().join(dest), lines.join("\n") + "\n").unwrap();
    };
    slice("data/train.tsv", n_train, "train.tsv");
    slice("data/valid.tsv", n_test, "test.tsv");
    std::fs::write(dir.path().join("model.json"), model_json).unwrap();
    dir
}

/// kb-train flags for a from-scratch run on the files [`workspace`] writes (a tokenizer of 300
/// tokens, `model.json`, rows of at most 48 tokens, one worker).
pub const SCRATCH_FLAGS: [&str; 16] = [
    "--init",
    "scratch",
    "--model_config",
    "model.json",
    "--tokenizer_vocab_size",
    "300",
    "--train_file",
    "train.tsv",
    "--test_file",
    "test.tsv",
    "--max_len",
    "48",
    "--lr",
    "3e-3",
    "--num_workers",
    "1",
];

/// Runs the kb-train binary in `dir` with `args`.
pub fn run_kb_train(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kb-train"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

/// Asserts success; returns stderr.
pub fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "kb-train failed:\n{err}");
    err
}

/// Asserts failure; returns stderr.
pub fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "kb-train should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `(step, value)` of the records of a run's metrics.jsonl that have `key` (`train_loss`,
/// `val_loss`).
pub fn losses(run: &Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v[key].is_number())
        .map(|v| (v["step"].as_u64().unwrap(), v[key].as_f64().unwrap()))
        .collect()
}

/// A checkpoint's tensors, sorted by name: name, dtype, values read as f32.
pub fn weights(dir: &Path) -> Vec<(String, safetensors::Dtype, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| {
            let v = t
                .data()
                .chunks(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (n, t.dtype(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Largest absolute difference between two checkpoints' tensors, and where.
pub fn max_weight_difference(a: &Path, b: &Path) -> (f32, String) {
    let (wa, wb) = (weights(a), weights(b));
    assert_eq!(wa.len(), wb.len());
    let mut worst = (0f32, String::new());
    for ((na, _, va), (nb, _, vb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        for (x, y) in va.iter().zip(vb) {
            let d = (x - y).abs();
            if d > worst.0 {
                worst = (d, na.clone());
            }
        }
    }
    worst
}
