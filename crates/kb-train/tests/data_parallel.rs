//! Data-parallel training on the CPU (`--dp_workers N`): the same code path as multi-GPU
//! training, with an in-process all-reduce in place of NCCL. N workers × batch B must train the
//! same model as 1 worker × batch N·B.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

/// The first `n_train`/`n_test` rows of data/ and a 1+1-layer BART with dropout off (dropout
/// masks are drawn per worker, so only a dropout-free model can be compared exactly).
fn dp_workspace(n_train: usize, n_test: usize) -> tempfile::TempDir {
    workspace(
        n_train,
        n_test,
        r#"{"d_model": 32, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
            "decoder_attention_heads": 2, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
            "max_position_embeddings": 64, "dropout": 0.0, "attention_dropout": 0.0,
            "activation_dropout": 0.0, "init_std": 0.05}"#,
    )
}

fn kb_train(dir: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&str> = SCRATCH_FLAGS.to_vec();
    args.extend_from_slice(extra);
    run_kb_train(dir, &args)
}

fn assert_losses_close(a: &[(u64, f64)], b: &[(u64, f64)], tol: f64, what: &str) {
    assert_eq!(
        a.iter().map(|p| p.0).collect::<Vec<_>>(),
        b.iter().map(|p| p.0).collect::<Vec<_>>(),
        "{what}: same steps"
    );
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x.1 - y.1).abs() <= tol,
            "{what} at step {}: {} vs {} (tolerance {tol})",
            x.0,
            x.1,
            y.1
        );
    }
}

// Tolerances. Splitting a batch changes only the order in which float32 gradient sums are
// taken (one sum over 8 rows versus two sums over 4 rows added together), so the runs agree to
// rounding: losses to 1e-5, weights to 2e-5. Measured here: 3.6e-6 (2×4) and 5.3e-6 (3×3),
// both in an attention key-projection bias — its gradient is analytically zero (softmax ignores
// a shift shared by all keys), so Adam normalises pure rounding noise there; every other
// tensor agrees far closer.
const LOSS_TOL: f64 = 1e-5;
const WEIGHT_TOL: f32 = 2e-5;

#[test]
fn two_workers_of_four_train_the_same_model_as_one_worker_of_eight() {
    let dir = dp_workspace(64, 16);
    // 64 rows in global batches of 8: 8 steps per epoch; 6 steps end mid-epoch.
    let common = ["--max_steps", "6", "--val_check_interval", "3"];
    ok(&kb_train(
        dir.path(),
        &[&common[..], &["--batch_size", "8", "--checkpoint", "one"]].concat(),
    ));
    let err = ok(&kb_train(
        dir.path(),
        &[
            &common[..],
            &[
                "--batch_size",
                "4",
                "--dp_workers",
                "2",
                "--checkpoint",
                "two",
            ],
        ]
        .concat(),
    ));
    assert!(err.contains("2 CPU workers"), "{err}");
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    assert_losses_close(
        &losses(&one, "train_loss"),
        &losses(&two, "train_loss"),
        LOSS_TOL,
        "train_loss",
    );
    let (va, vb) = (losses(&one, "val_loss"), losses(&two, "val_loss"));
    assert_eq!(va.len(), 2, "validation at step 3 and at the end");
    assert_losses_close(&va, &vb, LOSS_TOL, "val_loss (sharded over workers)");
    let (d, name) = max_weight_difference(&one.join("model_chp/last"), &two.join("model_chp/last"));
    eprintln!("2×4 vs 1×8: largest weight difference {d} ({name})");
    assert!(d <= WEIGHT_TOL, "{name} differs by {d}");
    // the same checkpoints, written once
    let names = |run: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(run.join("model_chp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(&one).len(), names(&two).len());
}

#[test]
fn workers_left_without_rows_still_take_part() {
    // 64 rows in global batches of 9: the epoch's last batch has 1 row, so two of the three
    // workers get none in that step and contribute zero gradient.
    let dir = dp_workspace(64, 16);
    ok(&kb_train(
        dir.path(),
        &[
            "--batch_size",
            "9",
            "--max_epochs",
            "1",
            "--checkpoint",
            "one",
        ],
    ));
    ok(&kb_train(
        dir.path(),
        &[
            "--batch_size",
            "3",
            "--dp_workers",
            "3",
            "--max_epochs",
            "1",
            "--checkpoint",
            "three",
        ],
    ));
    let (one, three) = (dir.path().join("one"), dir.path().join("three"));
    let l1 = losses(&one, "train_loss");
    assert_eq!(l1.len(), 8);
    assert_losses_close(&l1, &losses(&three, "train_loss"), LOSS_TOL, "train_loss");
    assert_losses_close(
        &losses(&one, "val_loss"),
        &losses(&three, "val_loss"),
        LOSS_TOL,
        "val_loss",
    );
    let (d, name) =
        max_weight_difference(&one.join("model_chp/last"), &three.join("model_chp/last"));
    eprintln!("3×3 vs 1×9: largest weight difference {d} ({name})");
    assert!(d <= WEIGHT_TOL, "{name} differs by {d}");
}

#[test]
fn a_data_parallel_run_resumes_exactly() {
    let dir = dp_workspace(48, 8);
    let common = [
        "--batch_size",
        "4",
        "--dp_workers",
        "2",
        "--max_epochs",
        "2",
    ];
    ok(&kb_train(
        dir.path(),
        &[&common[..], &["--checkpoint", "full"]].concat(),
    ));
    let err = ok(&kb_train(
        dir.path(),
        &[&common[..], &["--checkpoint", "split", "--stop_after", "4"]].concat(),
    ));
    assert!(err.contains("--resume"), "{err}");
    ok(&kb_train(dir.path(), &["--resume", "split"]));
    let (full, split) = (dir.path().join("full"), dir.path().join("split"));
    let lf = losses(&full, "train_loss");
    assert_eq!(lf.len(), 12, "48 rows / (2 × 4) × 2 epochs");
    assert_losses_close(&lf, &losses(&split, "train_loss"), 1e-6, "train_loss");
    let (d, name) =
        max_weight_difference(&full.join("model_chp/last"), &split.join("model_chp/last"));
    assert!(d <= 1e-6, "{name} differs by {d}");
    let h: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(split.join("model_chp/last/hparams.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(h["settings"]["dp_workers"], 2);
}

#[test]
fn bf16_training_learns_and_keeps_f32_weights() {
    let dir = dp_workspace(64, 16);
    let common = ["--batch_size", "8", "--max_steps", "8"];
    ok(&kb_train(
        dir.path(),
        &[&common[..], &["--checkpoint", "f32"]].concat(),
    ));
    let err = ok(&kb_train(
        dir.path(),
        &[
            &common[..],
            &["--checkpoint", "bf16", "--precision", "bf16"],
        ]
        .concat(),
    ));
    assert!(err.contains("Bf16"), "{err}");
    let (f32_run, bf16_run) = (dir.path().join("f32"), dir.path().join("bf16"));
    let (a, b) = (
        losses(&f32_run, "train_loss"),
        losses(&bf16_run, "train_loss"),
    );
    assert_eq!(a.len(), b.len());
    // bf16 keeps 8 bits of mantissa: the first loss (same weights, same batch) agrees to
    // about 1%; the run learns (loss falls) like the f32 one.
    assert!(
        (a[0].1 - b[0].1).abs() < 0.01 * a[0].1,
        "first losses {} vs {}",
        a[0].1,
        b[0].1
    );
    let (fa, fb) = (a.last().unwrap().1, b.last().unwrap().1);
    assert!(fb < b[0].1 - 0.1, "bf16 loss did not fall: {b:?}");
    assert!(
        (fa - fb).abs() < 0.05,
        "after {} steps: f32 {fa} vs bf16 {fb}\nf32 {a:?}\nbf16 {b:?}",
        a.len()
    );
    for (name, dtype, values) in weights(&bf16_run.join("model_chp/last")) {
        assert_eq!(dtype, safetensors::Dtype::F32, "{name}");
        assert!(values.iter().all(|v| v.is_finite()), "{name}");
    }
}

#[test]
fn parallel_flags_are_checked() {
    let dir = dp_workspace(16, 8);
    let err = failure(&kb_train(dir.path(), &["--num_gpus", "2"]));
    assert!(
        err.contains("--num_gpus") && err.contains("--dp_workers"),
        "{err}"
    );
    let err = failure(&kb_train(dir.path(), &["--devices", "0"]));
    assert!(
        err.contains("--devices") && err.contains("--accelerator gpu"),
        "{err}"
    );
    let err = failure(&kb_train(dir.path(), &["--dp_workers", "0"]));
    assert!(err.contains("dp_workers"), "{err}");
    let err = failure(&kb_train(dir.path(), &["--precision", "16"]));
    assert!(err.contains("bf16"), "{err}");
    let err = failure(&kb_train(
        dir.path(),
        &["--accelerator", "gpu", "--dp_workers", "2"],
    ));
    assert!(err.contains("--num_gpus"), "{err}");
    let err = failure(&kb_train(
        dir.path(),
        &["--accelerator", "gpu", "--devices", "0,0"],
    ));
    assert!(err.contains("twice"), "{err}");
    let err = failure(&kb_train(
        dir.path(),
        &["--accelerator", "gpu", "--num_nodes", "2"],
    ));
    assert!(err.contains("--rendezvous"), "{err}");
    let err = failure(&kb_train(
        dir.path(),
        &[
            "--accelerator",
            "gpu",
            "--num_nodes",
            "2",
            "--node_rank",
            "1",
            "--rendezvous",
            "udp:x",
        ],
    ));
    assert!(err.contains("tcp:HOST:PORT"), "{err}");
}
