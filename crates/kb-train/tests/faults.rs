//! A full or unwritable disk: a checkpoint, metrics.jsonl or loss.svg that cannot be written
//! stops kb-train with an error naming the path; the checkpoints saved before still load and
//! resume, and no temporary folder is left in model_chp/.
//!
//! Writes are made to fail with RLIMIT_FSIZE (a write past N bytes of a file fails with EFBIG,
//! as a full disk fails one with ENOSPC), which holds for root too, and with a read-only
//! model_chp/ where the tests do not run as root (root ignores permissions).

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;

const TINY_MODEL: &str = r#"{"d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64, "max_position_embeddings": 64, "dropout": 0.1}"#;

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = SCRATCH_FLAGS.to_vec();
    v.extend_from_slice(&["--batch_size", "8"]);
    v.extend_from_slice(extra);
    v
}

/// Runs kb-train in `dir` with no file allowed past `max_file_bytes`: writes beyond fail with
/// EFBIG (SIGXFSZ, which would kill the process instead, is ignored).
fn kb_train_with_file_limit(dir: &Path, extra: &[&str], max_file_bytes: u64) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kb-train"));
    cmd.current_dir(dir).args(args(extra));
    // SAFETY: between fork and exec the closure only makes two async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(move || {
            if libc::signal(libc::SIGXFSZ, libc::SIG_IGN) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            let limit = libc::rlimit {
                rlim_cur: max_file_bytes as libc::rlim_t,
                rlim_max: max_file_bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

fn global_step(checkpoint: &Path) -> u64 {
    let text = std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["global_step"].as_u64().unwrap()
}

/// Every checkpoint of the run loads as a model, and none is a temporary folder.
fn assert_checkpoints_intact(run: &Path) -> Vec<String> {
    let chp = run.join("model_chp");
    let names = names(&chp);
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "temporary folders left in model_chp: {names:?}"
    );
    for n in &names {
        kb_core::KeywordModel::load_dir(
            &chp.join(n),
            kb_core::candle_core::DType::F32,
            &kb_core::candle_core::Device::Cpu,
        )
        .unwrap_or_else(|e| panic!("{n}: {e}"));
    }
    names
}

/// The run ended with status 1 and `kb-train: error: …` naming every one of `parts`.
fn assert_error_names(out: &Output, parts: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("kb-train: error: "))
        .unwrap_or_else(|| panic!("no error line:\n{err}"));
    for p in parts {
        assert!(line.contains(p), "{p:?} not in: {line}");
    }
    line.to_string()
}

#[test]
fn a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_previous_ones() {
    let dir = workspace(64, 16, TINY_MODEL);
    let run = dir.path().join("run");
    // 8 steps per epoch: stopping after 10 leaves epoch 0's best checkpoint and `last` at 10.
    ok(&run_kb_train(
        dir.path(),
        &args(&[
            "--max_epochs",
            "2",
            "--checkpoint",
            "run",
            "--stop_after",
            "10",
        ]),
    ));
    let before = assert_checkpoints_intact(&run);
    assert_eq!(before.len(), 2, "{before:?}");
    // model.safetensors is about 175 kB: the save at the end of epoch 1 fails.
    let out = kb_train_with_file_limit(dir.path(), &["--resume", "run"], 100_000);
    let line = assert_error_names(
        &out,
        &[
            "cannot save checkpoint run/model_chp/epoch=01-val_loss=",
            "model.safetensors",
            "File too large",
            "the checkpoints saved before are kept",
        ],
    );
    eprintln!("{line}");
    assert_eq!(assert_checkpoints_intact(&run), before);
    assert_eq!(global_step(&run.join("model_chp/last")), 10);
    // Once there is room again, the run continues from `last`.
    ok(&run_kb_train(dir.path(), &["--resume", "run"]));
    assert_eq!(global_step(&run.join("model_chp/last")), 16);
    assert_checkpoints_intact(&run);
}

#[test]
fn metrics_that_cannot_be_written_stop_the_run_and_a_line_cut_short_is_dropped_on_resume() {
    // 160 rows: 20 steps per epoch; each metrics line is about 120 bytes, so with 1,500 bytes
    // allowed the file is full around step 12, before any checkpoint is due.
    let dir = workspace(160, 16, TINY_MODEL);
    let run = dir.path().join("run");
    ok(&run_kb_train(
        dir.path(),
        &args(&[
            "--max_epochs",
            "1",
            "--checkpoint",
            "run",
            "--stop_after",
            "3",
        ]),
    ));
    let out = kb_train_with_file_limit(dir.path(), &["--resume", "run"], 1_500);
    let line = assert_error_names(&out, &["run/metrics.jsonl", "File too large"]);
    eprintln!("{line}");
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    eprintln!(
        "metrics.jsonl: {} bytes, ends with a complete line: {}",
        text.len(),
        text.ends_with('\n')
    );
    assert_checkpoints_intact(&run);
    assert_eq!(global_step(&run.join("model_chp/last")), 3);
    // The resumed run drops the records after step 3, the last line cut short among them.
    ok(&run_kb_train(dir.path(), &["--resume", "run"]));
    let steps: Vec<u64> = losses(&run, "train_loss").iter().map(|p| p.0).collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>());
}

#[test]
fn a_loss_curve_that_cannot_be_written_stops_the_run_naming_it() {
    let dir = workspace(16, 8, TINY_MODEL);
    let run = dir.path().join("run");
    // A folder where the picture goes: writing it fails however privileged the process.
    std::fs::create_dir_all(run.join("loss.svg/x")).unwrap();
    let out = run_kb_train(
        dir.path(),
        &args(&["--max_epochs", "1", "--checkpoint", "run"]),
    );
    let line = assert_error_names(&out, &["cannot write the loss curve", "run/loss.svg"]);
    eprintln!("{line}");
    assert_checkpoints_intact(&run);
    assert!(
        names(&run).iter().all(|n| !n.starts_with(".loss.svg")),
        "{:?}",
        names(&run)
    );
}

#[test]
fn a_read_only_checkpoint_folder_stops_the_run_naming_it() {
    let dir = workspace(64, 16, TINY_MODEL);
    let run = dir.path().join("run");
    ok(&run_kb_train(
        dir.path(),
        &args(&[
            "--max_epochs",
            "2",
            "--checkpoint",
            "run",
            "--stop_after",
            "10",
        ]),
    ));
    let before = assert_checkpoints_intact(&run);
    let chp = run.join("model_chp");
    let set_mode = |mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&chp, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    set_mode(0o555);
    let probe = chp.join(".probe");
    if std::fs::create_dir(&probe).is_ok() {
        std::fs::remove_dir(&probe).unwrap();
        set_mode(0o755);
        eprintln!(
            "skipped: a read-only model_chp/ is writable here (running as root); \
             the RLIMIT_FSIZE tests cover the failing writes"
        );
        return;
    }
    let out = run_kb_train(dir.path(), &["--resume", "run"]);
    set_mode(0o755);
    let line = assert_error_names(&out, &["run/model_chp", "Permission denied"]);
    eprintln!("{line}");
    assert_eq!(assert_checkpoints_intact(&run), before);
}
