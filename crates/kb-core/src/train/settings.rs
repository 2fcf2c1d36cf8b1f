//! Training settings: the original recipe's hyper-parameters, readable from a TOML file
//! (`configs/*.toml`) and overridable from the command line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::source::DEFAULT_MODEL;

/// How the model's weights start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum InitMode {
    /// From a pretrained model (`model`: folder or hub id), as the original did.
    #[default]
    Pretrained,
    /// Randomly initialised from `model_config`, with a tokenizer trained on the training file.
    Scratch,
}

impl std::str::FromStr for InitMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "pretrained" => Ok(InitMode::Pretrained),
            "scratch" => Ok(InitMode::Scratch),
            _ => Err(format!("`{s}` is not pretrained or scratch")),
        }
    }
}

/// What the model is trained to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// The keywords of each question (the product).
    #[default]
    Keywords,
    /// Each question from a copy with spans masked (BART's text infilling, see
    /// [`super::denoise`]): pre-training for a model built from scratch, fine-tuned afterwards
    /// with `objective = "keywords"` and `model` set to its export.
    Denoise,
}

impl std::str::FromStr for Objective {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "keywords" => Ok(Objective::Keywords),
            "denoise" => Ok(Objective::Denoise),
            _ => Err(format!("`{s}` is not keywords or denoise")),
        }
    }
}

/// Where training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// The CPU.
    #[default]
    Cpu,
    /// CUDA GPUs (needs a build with the `cuda` feature).
    Gpu,
}

impl std::str::FromStr for Accelerator {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(Accelerator::Cpu),
            "gpu" | "cuda" => Ok(Accelerator::Gpu),
            _ => Err(format!("`{s}` is not cpu or gpu")),
        }
    }
}

/// Arithmetic of the forward and backward passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Precision {
    /// Plain f32 (Lightning's `32`).
    #[default]
    #[serde(rename = "32")]
    F32,
    /// bf16 compute with f32 master weights, optimizer and checkpoints (Lightning's
    /// `bf16-mixed`).
    #[serde(rename = "bf16")]
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "32" | "f32" | "32-true" => Ok(Precision::F32),
            "bf16" | "bf16-mixed" => Ok(Precision::Bf16),
            "16" | "f16" | "16-mixed" => Err(
                "f16 training (with loss scaling) is not supported; use --precision bf16, which needs no loss scaling".into(),
            ),
            _ => Err(format!("`{s}` is not 32 or bf16")),
        }
    }
}

impl Precision {
    /// The dtype of the forward and backward passes.
    pub fn compute_dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
        }
    }
}

/// Every training setting. Defaults are the original recipe's (`train.py`).
///
/// With the `cli` feature it is also a `clap::Args` group: every field is a `--field_name` flag
/// (kb-train derives its flags from this type, see [`TrainSettings::overlay_flags`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[cfg_attr(feature = "cli", command(rename_all = "snake_case"))]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    /// Pretrained model: folder or hub id.
    #[cfg_attr(feature = "cli", arg(long))]
    pub model: String,
    /// Weight initialisation.
    #[cfg_attr(feature = "cli", arg(long))]
    pub init: InitMode,
    /// `config.json` of the model to build with `init = "scratch"`.
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub model_config: Option<PathBuf>,
    /// Vocabulary size of the tokenizer trained with `init = "scratch"`.
    #[cfg_attr(feature = "cli", arg(long))]
    pub tokenizer_vocab_size: usize,
    /// Training TSV (`query`, `keyword`).
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub train_file: PathBuf,
    /// Validation TSV.
    #[cfg_attr(feature = "cli", arg(long, value_name = "FILE"))]
    pub test_file: PathBuf,
    /// Run folder: checkpoints under `model_chp/`, `metrics.jsonl`, `loss.svg`.
    #[cfg_attr(feature = "cli", arg(long, value_name = "DIR"))]
    pub checkpoint: PathBuf,
    /// Epochs.
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_epochs: usize,
    /// Stop after this many optimizer steps in total (also sets the schedule's length).
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_steps: Option<usize>,
    /// Rows per batch.
    #[cfg_attr(feature = "cli", arg(long))]
    pub batch_size: usize,
    /// Batches whose gradients are summed before each optimizer step.
    #[cfg_attr(feature = "cli", arg(long))]
    pub accumulate_grad_batches: usize,
    /// Peak learning rate.
    #[cfg_attr(feature = "cli", arg(long))]
    pub lr: f64,
    /// AdamW weight decay (not applied to biases).
    #[cfg_attr(feature = "cli", arg(long))]
    pub weight_decay: f64,
    /// Fraction of the steps spent warming the learning rate up from 0.
    #[cfg_attr(feature = "cli", arg(long))]
    pub warmup_ratio: f64,
    /// Clip gradients to this global norm (0 disables).
    #[cfg_attr(feature = "cli", arg(long))]
    pub gradient_clip_val: f64,
    /// Tokens kept of each query and keyword list.
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_len: usize,
    /// Seed for initialisation, data order and dropout.
    #[cfg_attr(feature = "cli", arg(long))]
    pub seed: u64,
    /// Threads that tokenize and build batches ahead of the model.
    #[cfg_attr(feature = "cli", arg(long))]
    pub num_workers: usize,
    /// CPU or GPU.
    #[cfg_attr(feature = "cli", arg(long))]
    pub accelerator: Accelerator,
    /// GPUs per node to use with `accelerator = "gpu"` (one data-parallel worker each).
    #[cfg_attr(feature = "cli", arg(long))]
    pub num_gpus: usize,
    /// Which GPUs (CUDA ordinals) to use, e.g. `[0, 2]`; default the first `num_gpus`.
    #[cfg_attr(feature = "cli", arg(long, value_delimiter = ',', value_name = "IDS"))]
    pub devices: Option<Vec<usize>>,
    /// Data-parallel worker threads with `accelerator = "cpu"` (each trains on its shard of
    /// every global batch, gradients summed in process) — the CPU form of multi-GPU training.
    #[cfg_attr(feature = "cli", arg(long))]
    pub dp_workers: usize,
    /// Machines taking part in GPU training (each runs `kb-train` with its `node_rank`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub num_nodes: usize,
    /// This machine's index among `num_nodes`, 0 being the one that writes checkpoints.
    #[cfg_attr(feature = "cli", arg(long))]
    pub node_rank: usize,
    /// How the nodes of a multi-node run find each other: `file:PATH` (a path on a filesystem
    /// they share) or `tcp:HOST:PORT` (node 0 listens there).
    #[cfg_attr(feature = "cli", arg(long, value_name = "SPEC"))]
    pub rendezvous: Option<String>,
    /// `32` or `bf16` (bf16 compute, f32 master weights).
    #[cfg_attr(feature = "cli", arg(long))]
    pub precision: Precision,
    /// Group rows of similar length into batches (less padding).
    #[cfg_attr(feature = "cli", arg(long, action = clap::ArgAction::Set))]
    pub bucket: bool,
    /// Also validate every N optimizer steps (besides each epoch end).
    #[cfg_attr(feature = "cli", arg(long))]
    pub val_check_interval: Option<usize>,
    /// Checkpoints kept by validation loss.
    #[cfg_attr(feature = "cli", arg(long))]
    pub save_top_k: usize,
    /// Save `last` every N optimizer steps (besides each epoch end).
    #[cfg_attr(feature = "cli", arg(long))]
    pub save_every_n_steps: Option<usize>,
    /// Skip malformed data rows (reporting them) instead of stopping.
    #[cfg_attr(feature = "cli", arg(long))]
    pub skip_bad_rows: bool,
    /// Span substitution: augmented copies per training row whose copied keywords are replaced
    /// by other rows' keywords or random Hangul (see `kb_core::train::augment`); 0 = off.
    #[cfg_attr(feature = "cli", arg(long))]
    pub augment_spans: f64,
    /// With `init = "scratch"`: start the tokenizer's alphabet with the 2,350 common Hangul
    /// syllables (KS X 1001), so that words unseen in training are still made of known tokens.
    #[cfg_attr(feature = "cli", arg(long, action = clap::ArgAction::Set))]
    pub tokenizer_hangul_alphabet: bool,
    /// What to train: `keywords` (the product), or `denoise` (reconstruct each question of the
    /// training and validation files from a copy with spans masked: pre-training, see
    /// `kb_core::train::denoise`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub objective: Objective,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.to_string(),
            init: InitMode::Pretrained,
            model_config: None,
            tokenizer_vocab_size: 8000,
            train_file: PathBuf::from("data/train.tsv"),
            test_file: PathBuf::from("data/test.tsv"),
            checkpoint: PathBuf::from("checkpoint"),
            max_epochs: 2,
            max_steps: None,
            batch_size: 8,
            accumulate_grad_batches: 1,
            lr: 3e-5,
            weight_decay: 0.01,
            warmup_ratio: 0.1,
            gradient_clip_val: 1.0,
            max_len: 512,
            seed: 42,
            num_workers: 4,
            accelerator: Accelerator::Cpu,
            num_gpus: 1,
            devices: None,
            dp_workers: 1,
            num_nodes: 1,
            node_rank: 0,
            rendezvous: None,
            precision: Precision::F32,
            bucket: true,
            val_check_interval: None,
            save_top_k: 3,
            save_every_n_steps: None,
            skip_bad_rows: false,
            augment_spans: 0.0,
            tokenizer_hangul_alphabet: false,
            objective: Objective::Keywords,
        }
    }
}

impl TrainSettings {
    /// Reads a TOML recipe; unknown keys are errors naming the key.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            field: "-".into(),
            message: e.to_string(),
        })
    }

    /// Checks values that would make training meaningless; returns the flag and why.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        let positive = [
            ("batch_size", self.batch_size),
            ("accumulate_grad_batches", self.accumulate_grad_batches),
            ("max_epochs", self.max_epochs),
            ("save_top_k", self.save_top_k),
            ("num_gpus", self.num_gpus),
            ("dp_workers", self.dp_workers),
            ("num_nodes", self.num_nodes),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err((name, "must be at least 1".into()));
            }
        }
        if self.max_len < 2 {
            return Err(("max_len", "must be at least 2".into()));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(("lr", format!("{} is not a positive learning rate", self.lr)));
        }
        if !(self.augment_spans >= 0.0 && self.augment_spans <= 16.0) {
            return Err((
                "augment_spans",
                format!(
                    "{} is not a number of copies from 0 to 16",
                    self.augment_spans
                ),
            ));
        }
        if self.objective == Objective::Denoise && self.augment_spans > 0.0 {
            return Err((
                "augment_spans",
                "span substitution applies to the keywords objective, not to denoise".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err((
                "warmup_ratio",
                format!("{} is not in [0, 1)", self.warmup_ratio),
            ));
        }
        if self.gradient_clip_val < 0.0 || self.weight_decay < 0.0 {
            return Err(("gradient_clip_val", "must not be negative".into()));
        }
        if self.init == InitMode::Scratch && self.model_config.is_none() {
            return Err((
                "model_config",
                "init = scratch needs --model_config PATH (e.g. configs/tiny-bart.json)".into(),
            ));
        }
        self.validate_parallel()?;
        if let Some(0) = self.max_steps {
            return Err(("max_steps", "must be at least 1".into()));
        }
        Ok(())
    }

    fn validate_parallel(&self) -> std::result::Result<(), (&'static str, String)> {
        if let Some(devices) = &self.devices {
            if devices.is_empty() {
                return Err(("devices", "names no GPU".into()));
            }
            let mut seen = devices.clone();
            seen.sort_unstable();
            seen.dedup();
            if seen.len() != devices.len() {
                return Err(("devices", format!("{devices:?} names a GPU twice")));
            }
            if self.num_gpus != 1 && self.num_gpus != devices.len() {
                return Err((
                    "devices",
                    format!(
                        "names {} GPUs but --num_gpus is {}; give one or make them agree",
                        devices.len(),
                        self.num_gpus
                    ),
                ));
            }
        }
        match self.accelerator {
            Accelerator::Cpu => {
                if self.devices.is_some() {
                    return Err((
                        "devices",
                        "GPUs need --accelerator gpu; for data-parallel training on the CPU use --dp_workers N".into(),
                    ));
                }
                if self.num_gpus > 1 {
                    return Err((
                        "num_gpus",
                        "GPUs need --accelerator gpu; for data-parallel training on the CPU use --dp_workers N".into(),
                    ));
                }
                if self.num_nodes > 1 {
                    return Err((
                        "num_nodes",
                        "multi-node training runs on GPUs (--accelerator gpu)".into(),
                    ));
                }
            }
            Accelerator::Gpu => {
                if self.dp_workers > 1 {
                    return Err((
                        "dp_workers",
                        "is for --accelerator cpu; on GPUs use --num_gpus N".into(),
                    ));
                }
            }
        }
        if self.node_rank >= self.num_nodes {
            return Err((
                "node_rank",
                format!(
                    "{} is not below --num_nodes {}",
                    self.node_rank, self.num_nodes
                ),
            ));
        }
        if self.num_nodes > 1 && self.rendezvous.is_none() {
            return Err((
                "rendezvous",
                "multi-node training needs --rendezvous file:PATH or tcp:HOST:PORT".into(),
            ));
        }
        if let Some(r) = &self.rendezvous {
            super::rendezvous::Rendezvous::parse(r).map_err(|e| ("rendezvous", e))?;
        }
        Ok(())
    }

    /// GPU ordinals this node trains on.
    pub fn local_devices(&self) -> Vec<usize> {
        self.devices
            .clone()
            .unwrap_or_else(|| (0..self.num_gpus).collect())
    }

    /// Data-parallel workers on this node.
    pub fn local_workers(&self) -> usize {
        match self.accelerator {
            Accelerator::Cpu => self.dp_workers,
            Accelerator::Gpu => self.local_devices().len(),
        }
    }

    /// Data-parallel workers in the whole run: the global batch is `batch_size` times this.
    pub fn world_size(&self) -> usize {
        self.local_workers() * self.num_nodes
    }
}

/// kb-train's flags, derived from [`TrainSettings`]' fields (`cli` feature).
#[cfg(feature = "cli")]
impl TrainSettings {
    /// Makes `cmd` — a command that flattens this group — usable as an overlay on a recipe:
    /// every settings flag becomes optional, shows the recipe default in `--help`, and accepts a
    /// kebab-case alias (`--max-epochs`) besides its snake_case name (`--max_epochs`, the
    /// original `train.py` spelling).
    pub fn prepare_command(cmd: clap::Command) -> clap::Command {
        let defaults = serde_json::to_value(Self::default()).expect("settings serialise");
        cmd.mut_args(|arg| {
            let id = arg.get_id().as_str().to_string();
            let mut arg = arg;
            if let Some(long) = arg.get_long().filter(|l| l.contains('_')) {
                let kebab: &'static str = Box::leak(long.replace('_', "-").into_boxed_str());
                arg = arg.alias(kebab);
            }
            let takes_value = matches!(
                arg.get_action(),
                clap::ArgAction::Set | clap::ArgAction::Append
            );
            match defaults.get(&id) {
                Some(v) if takes_value && !v.is_null() && !v.is_array() => {
                    let text = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    let text: &'static str = Box::leak(text.into_boxed_str());
                    arg.required(false).default_value(text)
                }
                _ => arg,
            }
        })
    }

    /// `base` (the recipe's defaults or a `--config` file) with the settings flags given on the
    /// command line applied; `matches` come from a command made by
    /// [`TrainSettings::prepare_command`].
    pub fn overlay_flags(base: &Self, matches: &clap::ArgMatches) -> Result<Self> {
        use clap::FromArgMatches;
        let flags = Self::from_arg_matches(matches).map_err(|e| Error::Invalid(e.to_string()))?;
        let flags = serde_json::to_value(flags).expect("settings serialise");
        let mut merged = serde_json::to_value(base).expect("settings serialise");
        if let (Some(merged), Some(flags)) = (merged.as_object_mut(), flags.as_object()) {
            for (name, value) in flags {
                if matches.value_source(name) == Some(clap::parser::ValueSource::CommandLine) {
                    merged.insert(name.clone(), value.clone());
                }
            }
        }
        serde_json::from_value(merged).map_err(|e| Error::Invalid(format!("settings: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_original_recipe() {
        let s = TrainSettings::default();
        assert_eq!((s.max_epochs, s.batch_size, s.max_len), (2, 8, 512));
        assert_eq!(
            (s.lr, s.gradient_clip_val, s.warmup_ratio),
            (3e-5, 1.0, 0.1)
        );
        assert_eq!(s.save_top_k, 3);
    }

    /// Every recipe the project ships reads and validates (the README runs them by name).
    #[test]
    fn shipped_recipes_read_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut read = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let s = TrainSettings::from_toml_file(&path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                s.validate()
                    .unwrap_or_else(|(f, m)| panic!("{}: {f}: {m}", path.display()));
                read.push((path.file_stem().unwrap().to_string_lossy().to_string(), s));
            }
        }
        let recipe = |name: &str| &read.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(recipe("denoise-cpu").objective, Objective::Denoise);
        let full = recipe("full-cpu");
        assert_eq!(full.init, InitMode::Pretrained);
        assert!(
            full.model.starts_with(
                &recipe("denoise-cpu")
                    .checkpoint
                    .to_string_lossy()
                    .to_string()
            ),
            "the full recipe starts from the denoising run's checkpoint"
        );
    }

    #[test]
    fn toml_overrides_and_rejects_unknown_keys() {
        let s: TrainSettings =
            toml::from_str("max_epochs = 5\nlr = 1e-4\ninit = \"scratch\"\n").unwrap();
        assert_eq!(s.max_epochs, 5);
        assert_eq!(s.init, InitMode::Scratch);
        let e = toml::from_str::<TrainSettings>("learning_rate = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rate"), "{e}");
    }

    #[cfg(feature = "cli")]
    #[test]
    fn flags_overlay_the_recipe() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            settings: TrainSettings,
        }
        use clap::CommandFactory;
        let cmd = TrainSettings::prepare_command(Cli::command());
        cmd.clone().debug_assert();
        let recipe = TrainSettings {
            max_epochs: 12,
            lr: 1e-3,
            ..TrainSettings::default()
        };
        let m = cmd
            .clone()
            .try_get_matches_from([
                "kb-train",
                "--max-epochs",
                "3",
                "--bucket",
                "false",
                "--devices",
                "0,2",
                "--skip_bad_rows",
                "--precision",
                "bf16",
            ])
            .unwrap();
        let s = TrainSettings::overlay_flags(&recipe, &m).unwrap();
        assert_eq!(s.max_epochs, 3);
        assert_eq!(s.lr, 1e-3, "a flag not given keeps the recipe's value");
        assert!(!s.bucket && s.skip_bad_rows);
        assert_eq!(s.devices, Some(vec![0, 2]));
        assert_eq!(s.precision, Precision::Bf16);
        let none = cmd.clone().try_get_matches_from(["kb-train"]).unwrap();
        assert_eq!(
            TrainSettings::overlay_flags(&recipe, &none).unwrap(),
            recipe
        );
        let help = cmd.clone().render_long_help().to_string();
        assert!(
            help.contains("--warmup_ratio") && help.contains("[default: 0.1]"),
            "{help}"
        );
        assert!(cmd
            .try_get_matches_from(["kb-train", "--precision", "16"])
            .is_err());
    }
}
