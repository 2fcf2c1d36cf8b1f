//! Training checkpoints: a folder that is both a loadable model folder (`config.json`,
//! `tokenizer.json`, `generation_config.json`, `model.safetensors` with transformers' names) and
//! everything `--resume` needs (`optimizer.safetensors`, `trainer_state.json`, `hparams.json`).
//!
//! Folders are written under a temporary name (`.tmp-NAME-PID`) and put in place in one step
//! ([`install_dir`]), so a process killed at any moment never leaves a checkpoint that fails to
//! load, and a failed write (a full disk) removes what it wrote. [`recover_checkpoints`] tidies
//! what a killed process left behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::settings::TrainSettings;
use crate::config::BartConfig;
use crate::error::{Error, Result};
use crate::generation::GenerationConfig;
use crate::tokenizer::KoTokenizer;

/// Files every checkpoint holds.
pub const CHECKPOINT_FILES: [&str; 7] = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "model.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
    "hparams.json",
];

/// A checkpoint kept for its validation loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RankedCheckpoint {
    /// Folder name under `model_chp/`.
    pub name: String,
    /// Its validation loss.
    pub val_loss: f64,
}

/// Where training stands: enough to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Format version of this file.
    pub format: u32,
    /// Optimizer steps taken.
    pub global_step: usize,
    /// Current epoch (0-based).
    pub epoch: usize,
    /// Batches of `epoch` already consumed.
    pub batches_done: usize,
    /// Total optimizer steps of the run (the schedule's length).
    pub total_steps: usize,
    /// Warmup steps of the schedule.
    pub warmup_steps: usize,
    /// Kept checkpoints, best first.
    pub best: Vec<RankedCheckpoint>,
    /// Latest validation loss.
    pub val_loss: Option<f64>,
    /// Training seconds so far.
    pub elapsed_s: f64,
}

impl TrainerState {
    /// Current format version.
    pub const FORMAT: u32 = 1;
}

/// What a checkpoint folder holds, borrowed from the trainer.
pub struct CheckpointData<'a> {
    /// All model tensors by transformers name.
    pub tensors: &'a HashMap<String, Tensor>,
    /// Optimizer moments.
    pub optimizer: &'a AdamW,
    /// Trainer position.
    pub state: &'a TrainerState,
    /// Settings of the run.
    pub settings: &'a TrainSettings,
    /// Model configuration (as `config.json`).
    pub config_json: &'a serde_json::Value,
    /// Generation defaults to ship with the model.
    pub generation: &'a GenerationConfig,
    /// Tokenizer.
    pub tokenizer: &'a KoTokenizer,
    /// The training labels' derived terms, for grounded decoding
    /// ([`crate::pipeline::DERIVED_TERMS_FILE`]).
    pub derived_terms: &'a crate::generation::DerivedTerms,
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Invalid(format!("cannot serialise {}: {e}", path.display())))?;
    std::fs::write(path, text + "\n").map_err(|e| Error::io(path, e))
}

fn sync_dir_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        if let Ok(f) = std::fs::File::open(&path) {
            f.sync_all().map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

/// Writes a checkpoint folder at `dest` atomically (temporary folder, then [`install_dir`]; an
/// existing `dest` is replaced only once the new one is complete). On failure (a full or
/// read-only disk) the temporary folder is removed, `dest` is left as it was, and the error
/// names the checkpoint and the file that could not be written.
pub fn write_checkpoint(dest: &Path, data: &CheckpointData<'_>) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    let old = parent.join(format!(".old-{name}-{}", std::process::id()));
    let written = std::fs::create_dir_all(parent)
        .map_err(|e| Error::io(parent, e))
        .and_then(|()| write_checkpoint_files(&tmp, data))
        .and_then(|()| install_dir(&tmp, dest, &old));
    written.map_err(|e| {
        remove_leftover(&tmp);
        Error::Invalid(format!(
            "cannot save checkpoint {}: {e}; the checkpoints saved before are kept",
            dest.display()
        ))
    })
}

/// Writes every file of a checkpoint into a new folder `tmp` and flushes them to disk.
fn write_checkpoint_files(tmp: &Path, data: &CheckpointData<'_>) -> Result<()> {
    if tmp.exists() {
        std::fs::remove_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
    }
    std::fs::create_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
    crate::weights::save_safetensors(data.tensors, &tmp.join("model.safetensors"))?;
    let mut moments = HashMap::new();
    for p in &data.optimizer.params {
        moments.insert(
            format!("exp_avg.{}", p.name),
            p.exp_avg.to_device(&Device::Cpu)?,
        );
        moments.insert(
            format!("exp_avg_sq.{}", p.name),
            p.exp_avg_sq.to_device(&Device::Cpu)?,
        );
    }
    let path = tmp.join("optimizer.safetensors");
    candle_core::safetensors::save(&moments, &path)
        .map_err(|e| Error::Weights(format!("cannot write {}: {e}", path.display())))?;
    write_json(&tmp.join("config.json"), data.config_json)?;
    write_json(
        &tmp.join("generation_config.json"),
        &data.generation.to_json(),
    )?;
    write_json(&tmp.join("trainer_state.json"), data.state)?;
    let hparams = serde_json::json!({
        "settings": data.settings,
        "optimizer_step": data.optimizer.step,
    });
    write_json(&tmp.join("hparams.json"), &hparams)?;
    data.tokenizer.save(tmp)?;
    data.derived_terms
        .write(&tmp.join(crate::pipeline::DERIVED_TERMS_FILE))?;
    sync_dir_files(tmp)
}

/// Removes a temporary folder left by a failed write, saying so if it cannot.
fn remove_leftover(dir: &Path) {
    if dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }
}

/// Puts the complete folder `tmp` in place as `dest`. An existing `dest` is exchanged with `tmp`
/// in one step where the system can (Linux's `renameat2` with `RENAME_EXCHANGE`), so that `dest`
/// names a complete folder at every moment, and the old one is then removed. Elsewhere (another
/// system, or a filesystem without the exchange) `dest` is first renamed to `old`, then `tmp` to
/// `dest`: a process killed between the two leaves only `old`, which [`find_last`] and
/// [`recover_checkpoints`] take back.
pub fn install_dir(tmp: &Path, dest: &Path, old: &Path) -> Result<()> {
    if !dest.exists() {
        return std::fs::rename(tmp, dest).map_err(|e| Error::io(dest, e));
    }
    match exchange(tmp, dest) {
        Ok(()) => {
            // `tmp` now holds the folder `dest` held.
            remove_leftover(tmp);
            return Ok(());
        }
        Err(e) if exchange_unsupported(&e) => {}
        Err(e) => return Err(Error::io(dest, e)),
    }
    std::fs::rename(dest, old).map_err(|e| Error::io(dest, e))?;
    if let Err(e) = std::fs::rename(tmp, dest) {
        // Put the old folder back rather than leave no `dest`.
        let _ = std::fs::rename(old, dest);
        return Err(Error::io(dest, e));
    }
    remove_leftover(old);
    Ok(())
}

/// Exchanges two paths in one step (both must exist).
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths relative to the working directory; the system call
    // only reads them. Through `syscall` rather than libc's wrapper, which old C libraries lack.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::ErrorKind::Unsupported.into())
}

/// Whether an exchange failed only because the system or filesystem cannot do it.
fn exchange_unsupported(e: &std::io::Error) -> bool {
    #[cfg(target_os = "linux")]
    if let Some(code) = e.raw_os_error() {
        return [libc::EINVAL, libc::ENOSYS, libc::EOPNOTSUPP, libc::ENOTSUP].contains(&code);
    }
    e.kind() == std::io::ErrorKind::Unsupported
}

/// Tidies a `model_chp/` folder after a process was killed while saving: a checkpoint renamed
/// away (`.old-NAME-PID`, see [`install_dir`]) whose `NAME` is missing is renamed back (the
/// newest complete one when there are several); every other `.old-…` and every `.tmp-…` folder
/// (one being written, or the previous version swapped out) is removed. Returns what it did, one
/// line each, also logged.
pub fn recover_checkpoints(chp: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let Ok(entries) = std::fs::read_dir(chp) else {
        return Ok(done);
    };
    let mut leftovers: Vec<(PathBuf, String)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().to_string();
            (name.starts_with(".tmp-") || name.starts_with(".old-")).then_some((p, name))
        })
        .collect();
    // Newest first, so that the newest `.old-` copy of a missing checkpoint is the one restored.
    leftovers.sort_by_key(|(p, _)| {
        std::cmp::Reverse(std::fs::metadata(p).and_then(|m| m.modified()).ok())
    });
    for (path, name) in leftovers {
        let original = name
            .strip_prefix(".old-")
            .and_then(|rest| rest.rsplit_once('-'))
            .map(|(n, _pid)| chp.join(n));
        if let Some(original) = original {
            if !original.exists() && check_checkpoint_dir(&path).is_ok() {
                std::fs::rename(&path, &original).map_err(|e| Error::io(&original, e))?;
                let line = format!(
                    "restored {} from {name}, left by a process stopped while replacing it",
                    original.display()
                );
                tracing::warn!("{line}");
                done.push(line);
                continue;
            }
        }
        match std::fs::remove_dir_all(&path) {
            Ok(()) => {
                let line = format!(
                    "removed {}, left by a process stopped while saving",
                    path.display()
                );
                tracing::warn!("{line}");
                done.push(line);
            }
            Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
        }
    }
    Ok(done)
}

/// A checkpoint read back for resuming.
pub struct LoadedCheckpoint {
    /// The folder.
    pub dir: PathBuf,
    /// Model configuration.
    pub config: BartConfig,
    /// `config.json` as written (fields preserved).
    pub config_json: serde_json::Value,
    /// Generation defaults.
    pub generation: GenerationConfig,
    /// Tokenizer.
    pub tokenizer: KoTokenizer,
    /// Model tensors.
    pub tensors: HashMap<String, Tensor>,
    /// Optimizer moments (`exp_avg.NAME`, `exp_avg_sq.NAME`).
    pub moments: HashMap<String, Tensor>,
    /// Trainer position.
    pub state: TrainerState,
    /// Settings the run used.
    pub settings: TrainSettings,
    /// Optimizer steps taken.
    pub optimizer_step: usize,
}

/// Whether `dir` is a complete kb-train checkpoint; the error names what is missing.
pub fn check_checkpoint_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::Invalid(format!(
            "{} is not a kb-train checkpoint folder (no such folder)",
            dir.display()
        )));
    }
    let missing: Vec<&str> = CHECKPOINT_FILES
        .iter()
        .copied()
        .filter(|f| !dir.join(f).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(Error::Invalid(format!(
            "{} is not a kb-train checkpoint: missing {}",
            dir.display(),
            missing.join(", ")
        )));
    }
    Ok(())
}

/// Reads a checkpoint folder onto `device`.
pub fn read_checkpoint(dir: &Path, device: &Device) -> Result<LoadedCheckpoint> {
    check_checkpoint_dir(dir)?;
    let read_json = |name: &str| -> Result<serde_json::Value> {
        let path = dir.join(name);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::Config {
            path,
            field: "-".into(),
            message: e.to_string(),
        })
    };
    let config = BartConfig::from_file(&dir.join("config.json"))?;
    let config_json = read_json("config.json")?;
    let generation = GenerationConfig::from_model_dir(dir, &config)?;
    let tokenizer = KoTokenizer::from_model_dir(dir, &config)?;
    let load = |name: &str| -> Result<HashMap<String, Tensor>> {
        let path = dir.join(name);
        candle_core::safetensors::load(&path, device)
            .map_err(|e| Error::Weights(format!("{}: cannot read: {e}", path.display())))
    };
    let tensors = load("model.safetensors")?;
    let moments = load("optimizer.safetensors")?;
    let state: TrainerState =
        serde_json::from_value(read_json("trainer_state.json")?).map_err(|e| Error::Config {
            path: dir.join("trainer_state.json"),
            field: "-".into(),
            message: e.to_string(),
        })?;
    let hparams = read_json("hparams.json")?;
    let settings: TrainSettings =
        serde_json::from_value(hparams["settings"].clone()).map_err(|e| Error::Config {
            path: dir.join("hparams.json"),
            field: "settings".into(),
            message: e.to_string(),
        })?;
    let optimizer_step = hparams["optimizer_step"].as_u64().unwrap_or(0) as usize;
    Ok(LoadedCheckpoint {
        dir: dir.to_path_buf(),
        config,
        config_json,
        generation,
        tokenizer,
        tensors,
        moments,
        state,
        settings,
        optimizer_step,
    })
}

/// The `last` checkpoint of a run folder, recovering from a crash between the two renames of
/// [`write_checkpoint`] (then only `.old-last-PID` exists).
pub fn find_last(run: &Path) -> Option<PathBuf> {
    let chp = run.join("model_chp");
    let last = chp.join("last");
    if last.is_dir() {
        return Some(last);
    }
    let entries = std::fs::read_dir(&chp).ok()?;
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .map(|n| n.to_string_lossy().starts_with(".old-last-"))
                .unwrap_or(false)
                && check_checkpoint_dir(p).is_ok()
        })
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// The checkpoint name the original used: `epoch=01-val_loss=0.307` (0-based epoch), with
/// `-step=N` added for mid-epoch validations.
pub fn checkpoint_name(epoch: usize, val_loss: f64, mid_epoch_step: Option<usize>) -> String {
    match mid_epoch_step {
        None => format!("epoch={epoch:02}-val_loss={val_loss:.3}"),
        Some(step) => format!("epoch={epoch:02}-step={step}-val_loss={val_loss:.3}"),
    }
}

/// Parses the validation loss out of a checkpoint name.
pub fn val_loss_of_name(name: &str) -> Option<f64> {
    name.rsplit("val_loss=").next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_original() {
        assert_eq!(checkpoint_name(1, 0.30712, None), "epoch=01-val_loss=0.307");
        assert_eq!(
            checkpoint_name(0, 1.5, Some(40)),
            "epoch=00-step=40-val_loss=1.500"
        );
        assert_eq!(val_loss_of_name("epoch=01-val_loss=0.307"), Some(0.307));
    }

    /// A folder standing in for a checkpoint: every file of one, `trainer_state.json` saying
    /// `tag`.
    fn fake_checkpoint(dir: &Path, tag: &str) {
        std::fs::create_dir_all(dir).unwrap();
        for f in CHECKPOINT_FILES {
            std::fs::write(dir.join(f), tag).unwrap();
        }
    }

    fn tag(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("trainer_state.json")).unwrap()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn install_replaces_a_folder_in_one_step_and_leaves_nothing_else() {
        let d = tempfile::tempdir().unwrap();
        let (tmp, dest, old) = (
            d.path().join(".tmp-last-1"),
            d.path().join("last"),
            d.path().join(".old-last-1"),
        );
        fake_checkpoint(&tmp, "first");
        install_dir(&tmp, &dest, &old).unwrap();
        fake_checkpoint(&tmp, "second");
        install_dir(&tmp, &dest, &old).unwrap();
        assert_eq!(tag(&dest), "second");
        assert_eq!(names(d.path()), ["last"]);
        // The exchange itself, where the system has it: both folders stay, swapped.
        fake_checkpoint(&tmp, "third");
        match exchange(&tmp, &dest) {
            Ok(()) => {
                assert_eq!((tag(&dest), tag(&tmp)), ("third".into(), "second".into()));
            }
            Err(e) if exchange_unsupported(&e) => {
                eprintln!("no RENAME_EXCHANGE here ({e}): install_dir renames twice");
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn leftovers_of_a_killed_save_are_recovered() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path();
        let chp = run.join("model_chp");
        // Killed between the two renames of the fallback: only `.old-last-7` holds `last`; a
        // half-written `.tmp-` folder and a swapped-out copy of a top-k checkpoint remain too.
        fake_checkpoint(&chp.join(".old-last-7"), "step 5");
        fake_checkpoint(&chp.join(".tmp-last-7"), "step 6");
        std::fs::remove_file(chp.join(".tmp-last-7/hparams.json")).unwrap();
        fake_checkpoint(&chp.join("epoch=00-val_loss=1.000"), "best");
        fake_checkpoint(&chp.join(".tmp-epoch=00-val_loss=1.000-9"), "best, old");
        assert_eq!(find_last(run), Some(chp.join(".old-last-7")));
        let done = recover_checkpoints(&chp).unwrap();
        assert_eq!(done.len(), 3, "{done:?}");
        assert_eq!(names(&chp), ["epoch=00-val_loss=1.000", "last"]);
        assert_eq!(tag(&chp.join("last")), "step 5");
        assert_eq!(find_last(run), Some(chp.join("last")));
        // A `.old-` copy of a checkpoint that is in place is only removed; a tidy folder is left
        // alone.
        fake_checkpoint(&chp.join(".old-last-8"), "step 4");
        recover_checkpoints(&chp).unwrap();
        assert_eq!(tag(&chp.join("last")), "step 5");
        assert_eq!(names(&chp), ["epoch=00-val_loss=1.000", "last"]);
        assert!(recover_checkpoints(&chp).unwrap().is_empty());
        assert!(recover_checkpoints(&run.join("nowhere"))
            .unwrap()
            .is_empty());
    }
}
