//! Stopping a run early and continuing it: the stop request (what SIGINT and SIGTERM set) ends a
//! run after the current optimizer step with `last` saved there, every worker stopping after the
//! same step, and `--resume` then trains the same model as an uninterrupted run. A second
//! signal ends kb-train at once, and the checkpoints saved before still load and resume.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use kb_core::train::{
    train, InitMode, RunOptions, StepReport, StopRequest, TrainOutcome, TrainProgress,
    TrainSettings,
};

const TINY_MODEL: &str = r#"{"d_model": 32, "encoder_layers": 1, "decoder_layers": 1,
    "encoder_attention_heads": 2, "decoder_attention_heads": 2, "encoder_ffn_dim": 64,
    "decoder_ffn_dim": 64, "max_position_embeddings": 64, "dropout": 0.1}"#;

// ---------------------------------------------------------------------------------------------
// Through the library: the stop request set at a chosen step.

/// Requests the stop once the reporting worker has taken optimizer step `at`.
struct StopAt {
    at: usize,
    stop: StopRequest,
}

impl TrainProgress for StopAt {
    fn epoch_started(&self, _: usize, _: usize, _: usize, _: usize) {}
    fn batches_done(&self, _: usize) {}
    fn step(&self, s: &StepReport) {
        if s.global_step == self.at {
            self.stop.request();
        }
    }
    fn epoch_finished(&self) {}
}

fn settings(dir: &Path, run: &str, dp_workers: usize) -> TrainSettings {
    TrainSettings {
        init: InitMode::Scratch,
        model_config: Some(dir.join("model.json")),
        tokenizer_vocab_size: 300,
        train_file: dir.join("train.tsv"),
        test_file: dir.join("test.tsv"),
        checkpoint: dir.join(run),
        max_epochs: 2,
        batch_size: 8 / dp_workers,
        dp_workers,
        max_len: 48,
        lr: 3e-3,
        num_workers: 1,
        val_check_interval: Some(3),
        ..Default::default()
    }
}

/// Trains `settings` (resuming `resume` when given), requesting a stop after step `stop_at`.
fn train_stopping_at(
    settings: &TrainSettings,
    resume: Option<&Path>,
    stop_at: Option<usize>,
) -> TrainOutcome {
    let stop = StopRequest::new();
    let options = RunOptions {
        resume: resume.map(Path::to_path_buf),
        progress: stop_at.map(|at| {
            Arc::new(StopAt {
                at,
                stop: stop.clone(),
            }) as Arc<dyn TrainProgress>
        }),
        stop,
        ..Default::default()
    };
    train(settings, &options).unwrap()
}

fn trainer_state(run: &Path) -> serde_json::Value {
    let path = run.join("model_chp/last/trainer_state.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn checkpoint_names(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run.join("model_chp"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

/// The same steps, losses within `tol`.
fn assert_same_losses(a: &Path, b: &Path, key: &str, tol: f64) {
    let (la, lb) = (losses(a, key), losses(b, key));
    assert_eq!(
        la.iter().map(|p| p.0).collect::<Vec<_>>(),
        lb.iter().map(|p| p.0).collect::<Vec<_>>(),
        "{key}: the same steps"
    );
    for (x, y) in la.iter().zip(&lb) {
        assert!(
            (x.1 - y.1).abs() < tol,
            "{key} at step {}: {} vs {}",
            x.0,
            x.1,
            y.1
        );
    }
}

/// An uninterrupted run, and one stopped at step 6 (after that step's validation) and at step 8
/// (an epoch's last step, before its validation), each time resumed: the same records, the
/// same checkpoints, the same weights.
fn stopped_and_resumed_equals_uninterrupted(dp_workers: usize) {
    let dir = workspace(64, 16, TINY_MODEL);
    // 64 rows in global batches of 8: 8 steps per epoch, 16 in all; validation every 3 steps.
    let full = train_stopping_at(&settings(dir.path(), "full", dp_workers), None, None);
    assert!(!full.interrupted && !full.stopped && full.global_step == 16);

    let split_settings = settings(dir.path(), "split", dp_workers);
    let split = dir.path().join("split");
    let first = train_stopping_at(&split_settings, None, Some(6));
    assert!(first.stopped && first.interrupted, "{first:?}");
    assert_eq!(first.global_step, 6);
    let state = trainer_state(&split);
    assert_eq!(
        (
            &state["global_step"],
            &state["epoch"],
            &state["batches_done"]
        ),
        (&6.into(), &0.into(), &6.into()),
        "`last` is where the run stopped"
    );
    assert_eq!(losses(&split, "train_loss").last().unwrap().0, 6);

    let second = train_stopping_at(&split_settings, Some(&split), Some(8));
    assert!(second.stopped && second.global_step == 8, "{second:?}");
    let state = trainer_state(&split);
    assert_eq!(
        (
            &state["global_step"],
            &state["epoch"],
            &state["batches_done"]
        ),
        (&8.into(), &0.into(), &8.into()),
        "stopped at the epoch's end, before its validation"
    );
    assert_eq!(
        losses(&split, "val_loss").last().unwrap().0,
        6,
        "the epoch-end validation is left to the resumed run"
    );

    let last = train_stopping_at(&split_settings, Some(&split), None);
    assert!(!last.interrupted && !last.stopped && last.global_step == 16);

    let full_run = dir.path().join("full");
    assert_same_losses(&full_run, &split, "train_loss", 1e-6);
    assert_same_losses(&full_run, &split, "val_loss", 1e-6);
    assert_eq!(
        losses(&full_run, "val_loss").len(),
        7,
        "steps 3, 6, 8 (the epoch's end), 9, 12, 15, 16"
    );
    assert_eq!(checkpoint_names(&full_run), checkpoint_names(&split));
    let (d, name) = max_weight_difference(
        &full_run.join("model_chp/last"),
        &split.join("model_chp/last"),
    );
    assert!(d < 1e-6, "{name} differs by {d}");
}

#[test]
fn a_stop_request_saves_last_and_resume_equals_an_uninterrupted_run() {
    stopped_and_resumed_equals_uninterrupted(1);
}

#[test]
fn data_parallel_workers_stop_after_the_same_step() {
    // Only worker 0 reports progress, so worker 1 may look at the request before it is made in
    // the step: the sum over the workers makes both stop after step 6 anyway (or they would
    // wait for each other forever).
    stopped_and_resumed_equals_uninterrupted(2);
}

// ---------------------------------------------------------------------------------------------
// Through the binary: signals.

/// kb-train running in the background, its stderr collected.
struct Running {
    child: Child,
    stderr: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(dir: &Path, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kb-train"))
            .current_dir(dir)
            .args(SCRATCH_FLAGS)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let line = line.unwrap();
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Running {
            child,
            stderr,
            reader: Some(reader),
        }
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child, which has not been waited for yet.
        let rc = unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits (at most two minutes) for `ready`; panics with the stderr so far if it never holds.
    fn wait_until(&mut self, what: &str, ready: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ready() {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "kb-train ended ({status}) before {what}:\n{}",
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("no {what} after two minutes:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits (at most two minutes) for the process to end; returns its status and stderr.
    fn finish(mut self) -> (ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "kb-train still running after two minutes:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        self.reader.take().unwrap().join().unwrap();
        (status, self.stderr())
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Running {
    /// A test that fails half-way leaves no kb-train running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Optimizer steps recorded in a run's metrics.jsonl so far (complete lines only).
fn steps_logged(run: &Path) -> usize {
    let Ok(text) = std::fs::read_to_string(run.join("metrics.jsonl")) else {
        return 0;
    };
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && l.contains("\"train_loss\""))
        .count()
}

/// The run folder's checkpoints hold no temporary or swapped-out folder.
fn assert_tidy(run: &Path) {
    let names = checkpoint_names(run);
    assert!(
        names.iter().all(|n| !n.starts_with('.')),
        "leftovers in model_chp: {names:?}"
    );
}

fn load(dir: &Path) {
    kb_core::KeywordModel::load_dir(
        dir,
        kb_core::candle_core::DType::F32,
        &kb_core::candle_core::Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
}

/// Starts a 60-step run with `extra` flags, sends `signal` once it has logged 3 steps, and
/// checks how it stops; then `--resume` finishes it, equal to an uninterrupted run.
fn signal_then_resume(signal: i32, name: &str, extra: &[&str]) {
    let dir = workspace(240, 16, TINY_MODEL);
    // 240 rows in global batches of 8: 30 steps per epoch, 60 in all.
    let args =
        |run: &'static str| [&["--max_epochs", "2", "--checkpoint", run][..], extra].concat();
    let started = Instant::now();
    let mut running = Running::start(dir.path(), &args("split"));
    let split = dir.path().join("split");
    running.wait_until("3 steps in metrics.jsonl", || steps_logged(&split) >= 3);
    running.signal(signal);
    let (status, err) = running.finish();
    eprintln!(
        "stopped in {:.1} s:\n{err}",
        started.elapsed().as_secs_f64()
    );

    assert_eq!(status.code(), Some(128 + signal), "{status}:\n{err}");
    let last_line = err.lines().last().unwrap();
    let step: usize = last_line
        .strip_prefix(&format!("kb-train: stopped by {name} after step "))
        .and_then(|rest| rest.strip_suffix("/60; continue with: kb-train --resume split"))
        .unwrap_or_else(|| panic!("the last line is not the stop line:\n{err}"))
        .parse()
        .unwrap();
    assert!((3..60).contains(&step), "{err}");
    assert_eq!(err.matches("stopped by").count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "kb-train: {name}: finishing the current optimizer step"
        )),
        "{err}"
    );
    assert_eq!(trainer_state(&split)["global_step"], step);
    assert_eq!(
        losses(&split, "train_loss").last().unwrap().0 as usize,
        step,
        "no step after the one named"
    );
    load(&split.join("model_chp/last"));
    assert_tidy(&split);

    ok(&run_kb_train(dir.path(), &["--resume", "split"]));
    assert_eq!(trainer_state(&split)["global_step"], 60);
    ok(&run_kb_train(
        dir.path(),
        &[&SCRATCH_FLAGS[..], &args("full")].concat(),
    ));
    let full = dir.path().join("full");
    assert_same_losses(&full, &split, "train_loss", 1e-6);
    assert_same_losses(&full, &split, "val_loss", 1e-6);
    let (d, name) =
        max_weight_difference(&full.join("model_chp/last"), &split.join("model_chp/last"));
    assert!(d < 1e-6, "{name} differs by {d}");
    assert_tidy(&split);
}

#[test]
fn sigterm_stops_after_the_step_saving_last_and_resume_finishes() {
    signal_then_resume(libc::SIGTERM, "SIGTERM", &["--batch_size", "8"]);
}

#[test]
fn sigint_stops_every_data_parallel_worker_after_the_same_step() {
    signal_then_resume(
        libc::SIGINT,
        "SIGINT",
        &["--batch_size", "4", "--dp_workers", "2"],
    );
}

#[test]
fn a_second_signal_ends_the_process_at_once_and_the_saved_checkpoint_resumes() {
    let dir = workspace(240, 16, TINY_MODEL);
    let run: PathBuf = dir.path().join("run");
    let mut running = Running::start(
        dir.path(),
        &[
            "--batch_size",
            "8",
            "--max_epochs",
            "2",
            "--save_every_n_steps",
            "1",
            "--checkpoint",
            "run",
        ],
    );
    running.wait_until("2 steps in metrics.jsonl", || steps_logged(&run) >= 2);
    // Both signals wait while the process is stopped, so the second one arrives while the first
    // one's stop is under way, however loaded the machine is.
    running.signal(libc::SIGSTOP);
    running.signal(libc::SIGTERM);
    running.signal(libc::SIGINT);
    let resumed = Instant::now();
    running.signal(libc::SIGCONT);
    let (status, err) = running.finish();
    eprintln!(
        "ended {:.3} s after SIGCONT:\n{err}",
        resumed.elapsed().as_secs_f64()
    );
    // Whichever of the two is handled second ends the process, with its status.
    let (first, second, code) = if err.contains("SIGINT while stopping") {
        ("SIGTERM", "SIGINT", 130)
    } else {
        ("SIGINT", "SIGTERM", 143)
    };
    assert_eq!(status.code(), Some(code), "{status}:\n{err}");
    assert!(
        err.contains(&format!(
            "kb-train: {first}: finishing the current optimizer step"
        )) && err.contains(&format!(
            "kb-train: {second} while stopping: stopping at once, without saving"
        )),
        "{err}"
    );
    assert!(!err.contains("stopped by"), "no graceful stop:\n{err}");
    // `last` (saved every step, maybe not the step being saved when the process ended) is a
    // complete checkpoint, and the run continues from it; a folder the process was writing when
    // it ended is removed then.
    load(&run.join("model_chp/last"));
    let step = trainer_state(&run)["global_step"].as_u64().unwrap();
    assert!(step >= 1, "{step}");
    eprintln!(
        "ended with `last` at step {step}, {} steps logged; model_chp: {:?}",
        steps_logged(&run),
        checkpoint_names(&run)
    );
    let err = ok(&run_kb_train(
        dir.path(),
        &["--resume", "run", "--stop_after", "1"],
    ));
    assert!(err.contains("--resume"), "{err}");
    assert_eq!(trainer_state(&run)["global_step"], step + 1);
    assert_tidy(&run);
}
