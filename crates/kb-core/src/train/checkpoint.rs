//! Training checkpoints: a folder that is both a loadable model folder (`config.json`,
//! `tokenizer.json`, `generation_config.json`, `model.safetensors` with transformers' names) and
//! everything `--resume` needs (`optimizer.safetensors`, `trainer_state.json`, `hparams.json`).
//!
//! Folders are written under a temporary name and renamed into place, so a process killed at any
//! moment never leaves a checkpoint that fails to load.

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

/// Writes a checkpoint folder at `dest` atomically (temporary folder, then rename; an existing
/// `dest` is replaced only once the new one is complete).
pub fn write_checkpoint(dest: &Path, data: &CheckpointData<'_>) -> Result<()> {
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "checkpoint".into());
    let tmp = parent.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;

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
    candle_core::safetensors::save(&moments, tmp.join("optimizer.safetensors"))?;
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
    data.tokenizer.save(&tmp)?;
    data.derived_terms
        .write(&tmp.join(crate::pipeline::DERIVED_TERMS_FILE))?;
    sync_dir_files(&tmp)?;

    if dest.exists() {
        let old = parent.join(format!(".old-{name}-{}", std::process::id()));
        std::fs::rename(dest, &old).map_err(|e| Error::io(dest, e))?;
        std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    } else {
        std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))?;
    }
    Ok(())
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
}
