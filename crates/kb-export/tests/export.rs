//! kb-export end to end: a checkpoint made by kb-core's trainer from the fixture model is
//! exported and checked against what transformers writes and against the checkpoint itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use kb_core::candle_core::{DType, Device, Tensor};
use kb_core::model::Pass;
use kb_core::train::{train, InitMode, RunOptions, TrainSettings};
use kb_core::KeywordModel;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../kb-core/tests/fixtures")
        .join(name)
}

/// A 2-step fine-tuning run of the fixture model; returns (tempdir, run folder).
fn trained_run() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for (src, n, dest) in [
        ("data/train.tsv", 32, "train.tsv"),
        ("data/valid.tsv", 8, "test.tsv"),
    ] {
        let text = std::fs::read_to_string(root.join(src)).unwrap();
        let lines: Vec<&str> = text.lines().take(n + 1).collect();
        std::fs::write(dir.path().join(dest), lines.join("\n") + "\n").unwrap();
    }
    let run = dir.path().join("run");
    let settings = TrainSettings {
        model: fixture("tiny-kobart").display().to_string(),
        init: InitMode::Pretrained,
        train_file: dir.path().join("train.tsv"),
        test_file: dir.path().join("test.tsv"),
        checkpoint: run.clone(),
        max_steps: Some(2),
        batch_size: 8,
        max_len: 64,
        lr: 1e-3,
        num_workers: 1,
        ..Default::default()
    };
    train(&settings, &RunOptions::default()).unwrap();
    (dir, run)
}

fn kb_export(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kb-export"))
        .args(args)
        .output()
        .unwrap()
}

/// kb-export with no file allowed past `max_file_bytes` (RLIMIT_FSIZE, which holds for root
/// too): a write beyond fails with EFBIG, as one on a full disk fails with ENOSPC. SIGXFSZ, which
/// would kill the process instead, is ignored.
fn kb_export_with_file_limit(args: &[&str], max_file_bytes: u64) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kb-export"));
    cmd.args(args);
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

fn logits(m: &KeywordModel) -> Tensor {
    let ids = Tensor::new(&[[40u32, 41, 42, 43, 44], [50, 51, 52, 3, 3]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let dec = Tensor::new(&[[1u32, 60, 61], [1, 62, 63]], &Device::Cpu).unwrap();
    m.model
        .forward(&ids, Some(&mask), &dec, None, Pass::Inference)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn export_round_trips_and_matches_transformers_layout() {
    let (dir, run) = trained_run();
    let out = dir.path().join("exported");
    let o = kb_export(&[
        "--best",
        run.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in kb_core::export::EXPORTED_FILES {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    // Tensor names, shapes and dtypes equal those transformers writes for the same config.
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("golden/tensor_names.json")).unwrap(),
    )
    .unwrap();
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let ours: serde_json::Map<String, serde_json::Value> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, serde_json::json!(t.shape())))
        .collect();
    assert_eq!(serde_json::Value::Object(ours), golden["safetensors"]);
    assert!(st
        .tensors()
        .iter()
        .all(|(_, t)| t.dtype() == safetensors::Dtype::F32));

    // config: base fields preserved, architecture set; generation: beam 5 as the original server
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BartForConditionalGeneration");
    assert_eq!(cfg["d_model"], 64);
    assert_eq!(
        cfg["classifier_dropout"], 0.0,
        "fields of the base config.json are kept"
    );
    let g: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            g["num_beams"].as_u64(),
            g["eos_token_id"].as_u64(),
            g["forced_eos_token_id"].as_u64()
        ),
        (Some(5), Some(1), Some(1))
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("tiny-kobart")
            && card.contains("train.tsv")
            && card.contains("final validation loss")
    );

    // Round trip: identical logits in f32; bounded in f16/bf16.
    let best = kb_core::export::best_checkpoint(&run).unwrap();
    let reference = logits(&KeywordModel::load_dir(&best, DType::F32, &Device::Cpu).unwrap());
    let exported = logits(&KeywordModel::load_dir(&out, DType::F32, &Device::Cpu).unwrap());
    assert_eq!(max_diff(&reference, &exported), 0.0);
    for (dtype, name, tol) in [(DType::F16, "f16", 0.05f32), (DType::BF16, "bf16", 0.25)] {
        let o2 = dir.path().join(format!("exported-{name}"));
        let r = kb_export(&[
            "--checkpoint",
            best.to_str().unwrap(),
            "--output_dir",
            o2.to_str().unwrap(),
            "--dtype",
            name,
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        let m = KeywordModel::load_dir(&o2, dtype, &Device::Cpu).unwrap();
        let d = max_diff(&reference, &logits(&m));
        assert!(d <= tol, "{name}: logits differ by {d} (tolerance {tol})");
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(o2.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            c["dtype"],
            if name == "f16" { "float16" } else { "bfloat16" }
        );
    }
}

#[test]
fn refuses_bad_inputs_clearly() {
    let (dir, run) = trained_run();
    let last = run.join("model_chp/last");
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "x").unwrap();
    let o = kb_export(&[
        "--checkpoint",
        last.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    assert!(
        out.join("keep.txt").exists(),
        "nothing lost without --force"
    );
    let o = kb_export(&[
        "--checkpoint",
        last.to_str().unwrap(),
        "--output_dir",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.join("keep.txt").exists() && out.join("model.safetensors").exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().to_string();
            n.starts_with('.').then_some(n)
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary folders left: {leftovers:?}"
    );

    let o = kb_export(&["--checkpoint", "/no/such/ckpt", "--output_dir", "x"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a kb-train checkpoint"));
    let o = kb_export(&[
        "--checkpoint",
        fixture("tiny-kobart").to_str().unwrap(),
        "--output_dir",
        "x",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not a kb-train checkpoint") && err.contains("trainer_state.json"),
        "{err}"
    );
    let o = kb_export(&[
        "--checkpoint",
        last.to_str().unwrap(),
        "--output_dir",
        "x",
        "--dtype",
        "int8",
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("int8"));

    // --hparams: the checkpoint's own settings pass; a different recipe is refused naming the key.
    let o = kb_export(&[
        "--model_binary",
        last.to_str().unwrap(),
        "--hparams",
        last.join("hparams.json").to_str().unwrap(),
        "--output_dir",
        dir.path().join("h").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recipe = dir.path().join("other.toml");
    std::fs::write(&recipe, "lr = 5e-5\nbatch_size = 8\n").unwrap();
    let o = kb_export(&[
        "--model_binary",
        last.to_str().unwrap(),
        "--hparams",
        recipe.to_str().unwrap(),
        "--output_dir",
        dir.path().join("h2").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("lr: checkpoint 0.001"),
        "{err}"
    );

    // Unreadable weights are named.
    std::fs::write(last.join("model.safetensors"), b"junk").unwrap();
    let o = kb_export(&[
        "--checkpoint",
        last.to_str().unwrap(),
        "--output_dir",
        dir.path().join("j").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("model.safetensors") && err.contains("cannot read weights"),
        "{err}"
    );
}

#[test]
fn a_failed_write_leaves_no_partial_folder_and_keeps_the_one_it_would_replace() {
    let (dir, run) = trained_run();
    let last = run.join("model_chp/last");
    let out = dir.path().join("exported");
    let hidden = || -> Vec<String> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with('.'))
            .collect()
    };
    let args = |force: bool| {
        let mut a = vec![
            "--checkpoint",
            last.to_str().unwrap(),
            "--output_dir",
            out.to_str().unwrap(),
        ];
        if force {
            a.push("--force");
        }
        a
    };
    // The fixture's model.safetensors is about 930 kB; everything else fits in 500 kB.
    let o = kb_export_with_file_limit(&args(false), 500_000);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    eprintln!("{err}");
    for part in [
        format!("kb-export: error: cannot export to {}", out.display()),
        "model.safetensors".into(),
        "File too large".into(),
    ] {
        assert!(err.contains(&part), "{part:?} not in: {err}");
    }
    assert!(!out.exists(), "no partial output folder");
    assert!(
        hidden().is_empty(),
        "temporary folders left: {:?}",
        hidden()
    );

    // An export in place is left as it was when its replacement fails.
    let o = kb_export(&args(false));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let reference = logits(&KeywordModel::load_dir(&out, DType::F32, &Device::Cpu).unwrap());
    let o = kb_export_with_file_limit(&args(true), 500_000);
    assert_eq!(o.status.code(), Some(1));
    for f in kb_core::export::EXPORTED_FILES {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let kept = logits(&KeywordModel::load_dir(&out, DType::F32, &Device::Cpu).unwrap());
    assert_eq!(max_diff(&reference, &kept), 0.0);
    assert!(
        hidden().is_empty(),
        "temporary folders left: {:?}",
        hidden()
    );
}
