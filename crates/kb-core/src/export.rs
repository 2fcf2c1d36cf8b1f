//! Training checkpoint → Hugging Face model folder (what the original `get_model_binary.py` did),
//! loadable by `BartForConditionalGeneration.from_pretrained`, `PreTrainedTokenizerFast` and
//! kb-core alike.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::BartConfig;
use crate::error::{Error, Result};
use crate::generation::GenerationConfig;
use crate::tokenizer::KoTokenizer;
use crate::train::checkpoint::{check_checkpoint_dir, install_dir, val_loss_of_name, TrainerState};
use crate::train::TrainSettings;
use crate::weights::{check_tensors, save_safetensors};

/// Files an exported folder holds.
pub const EXPORTED_FILES: [&str; 7] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "README.md",
];

/// What to export and how.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// A kb-train checkpoint folder.
    pub checkpoint: PathBuf,
    /// Destination folder.
    pub output_dir: PathBuf,
    /// Weight dtype of the exported file.
    pub dtype: DType,
    /// Replace a non-empty destination.
    pub force: bool,
    /// Settings file to check against the checkpoint's (`hparams.json` or a TOML recipe).
    pub hparams: Option<PathBuf>,
}

/// What was exported.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    /// The folder written.
    pub output_dir: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Size of `model.safetensors` in bytes.
    pub weight_bytes: u64,
    /// The checkpoint's validation loss, if known.
    pub val_loss: Option<f64>,
}

/// The checkpoint with the lowest validation loss in a run folder (`RUN/model_chp/epoch=…`).
pub fn best_checkpoint(run: &Path) -> Result<PathBuf> {
    let chp = run.join("model_chp");
    let entries = std::fs::read_dir(&chp).map_err(|e| Error::io(&chp, e))?;
    let mut best: Option<(f64, PathBuf)> = None;
    for entry in entries {
        let path = entry.map_err(|e| Error::io(&chp, e))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.starts_with('.') || check_checkpoint_dir(&path).is_err() {
            continue;
        }
        if let Some(v) = val_loss_of_name(&name) {
            if best.as_ref().map(|b| v < b.0).unwrap_or(true) {
                best = Some((v, path));
            }
        }
    }
    best.map(|b| b.1).ok_or_else(|| {
        Error::Invalid(format!(
            "{} holds no checkpoint named like epoch=NN-val_loss=X",
            chp.display()
        ))
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        field: "-".into(),
        message: e.to_string(),
    })
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("serialisable") + "\n";
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// transformers' name for a dtype (`config.json`'s `dtype`).
pub fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// Compares a settings file with the checkpoint's settings; returns the differing keys.
fn check_hparams(given: &Path, saved: &TrainSettings) -> Result<()> {
    let text = std::fs::read_to_string(given).map_err(|e| Error::io(given, e))?;
    let value: serde_json::Value = if given.extension().is_some_and(|e| e == "toml") {
        let t: toml::Value = toml::from_str(&text).map_err(|e| Error::Config {
            path: given.to_path_buf(),
            field: "-".into(),
            message: e.to_string(),
        })?;
        serde_json::to_value(t).expect("toml converts to json")
    } else {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: given.to_path_buf(),
            field: "-".into(),
            message: e.to_string(),
        })?;
        v.get("settings").cloned().unwrap_or(v)
    };
    let saved = serde_json::to_value(saved).expect("serialisable");
    let given_map = value.as_object().ok_or_else(|| Error::Config {
        path: given.to_path_buf(),
        field: "-".into(),
        message: "expected a table of settings".into(),
    })?;
    let mut diffs = Vec::new();
    for (k, v) in given_map {
        match saved.get(k) {
            None => diffs.push(format!("{k} (unknown setting)")),
            Some(s) if !same_value(s, v) => diffs.push(format!("{k}: checkpoint {s}, file {v}")),
            _ => {}
        }
    }
    if !diffs.is_empty() {
        return Err(Error::Invalid(format!(
            "--hparams {} does not match the checkpoint's settings: {}",
            given.display(),
            diffs.join("; ")
        )));
    }
    Ok(())
}

fn same_value(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(y.abs()).max(1.0),
        _ => a == b,
    }
}

/// The model card written as `README.md`.
fn model_card(
    settings: &TrainSettings,
    state: &TrainerState,
    val_loss: Option<f64>,
    checkpoint: &Path,
    dtype: DType,
) -> String {
    let base = match settings.init {
        crate::train::InitMode::Pretrained => format!("`{}`", settings.model),
        crate::train::InitMode::Scratch => format!(
            "none — trained from scratch ({} with a tokenizer trained on the training file)",
            settings
                .model_config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    };
    let val = val_loss
        .map(|v| format!("{v:.4}"))
        .unwrap_or_else(|| "unknown".into());
    format!(
        "---\nlibrary_name: transformers\nlanguage: ko\npipeline_tag: text2text-generation\ntags:\n- bart\n- keyword-extraction\n- kobart-keywords\n---\n\n\
# Korean keyword extractor (BART)\n\n\
Turns a Korean question into comma-separated keywords, e.g. `이사화물 통관예약을 하면 뭐가 좋나요?` → `이사화물, 통관, 예약, 장점`.\n\
Fine-tuned with kobart-keywords (`kb-train`), exported by `kb-export` from `{checkpoint}`.\n\n\
| | |\n|---|---|\n\
| base model | {base} |\n\
| training data | `{train}` |\n\
| validation data | `{test}` |\n\
| final validation loss | {val} (cross-entropy per keyword token) |\n\
| optimizer steps | {steps} of {total} |\n\
| epochs | {epochs} |\n\
| batch size × accumulation | {bs} × {acc} |\n\
| learning rate | {lr} (AdamW, weight decay {wd}, linear warmup {wr} then linear decay) |\n\
| gradient clipping | {clip} |\n\
| max_len | {max_len} |\n\
| seed | {seed} |\n\
| weights dtype | {dtype} |\n\n\
## Use\n\n\
```sh\nkb-extract --model THIS_FOLDER \"해외직구 면세한도는 얼마인가요?\"\nkb-serve --model THIS_FOLDER\n```\n\n\
```python\nfrom transformers import BartForConditionalGeneration, PreTrainedTokenizerFast\n\
tok = PreTrainedTokenizerFast.from_pretrained(\"THIS_FOLDER\")\n\
model = BartForConditionalGeneration.from_pretrained(\"THIS_FOLDER\")\n\
ids = tok.encode(\"해외직구 면세한도는 얼마인가요?\", return_tensors=\"pt\")\n\
print(tok.decode(model.generate(ids)[0], skip_special_tokens=True))  # beam 5 from generation_config.json\n```\n",
        checkpoint = checkpoint.display(),
        train = settings.train_file.display(),
        test = settings.test_file.display(),
        steps = state.global_step,
        total = state.total_steps,
        epochs = settings.max_epochs,
        bs = settings.batch_size,
        acc = settings.accumulate_grad_batches,
        lr = settings.lr,
        wd = settings.weight_decay,
        wr = settings.warmup_ratio,
        clip = settings.gradient_clip_val,
        max_len = settings.max_len,
        seed = settings.seed,
        dtype = torch_dtype_name(dtype),
    )
}

/// Exports a checkpoint (see the module docs). The destination is written under a temporary
/// name and put in place in one step ([`install_dir`]), so an interrupted export leaves nothing
/// half-written, and one that fails (a full or read-only disk) removes what it wrote and leaves
/// an existing destination as it was; the error names the folder and the file.
pub fn export(opts: &ExportOptions) -> Result<ExportSummary> {
    let ck = &opts.checkpoint;
    let out = &opts.output_dir;
    check_checkpoint_dir(ck)?;
    check_export_dtype(opts.dtype)?;
    check_destination(out, opts.force)?;

    let mut model = read_model_files(ck)?;
    let settings = read_settings(ck)?;
    if let Some(h) = &opts.hparams {
        check_hparams(h, &settings)?;
    }
    let state = read_trainer_state(ck)?;
    let tensors = read_weights(ck, &model.config, opts.dtype)?;
    let val_loss = checkpoint_val_loss(ck, &state);

    let staging = Staging::next_to(out);
    exported_config(&mut model.config_json, ck, opts.dtype)?;
    let card = model_card(&settings, &state, val_loss, ck, opts.dtype);
    let written = staging
        .write(|tmp| write_files(tmp, ck, &model, &tensors, &card))
        .and_then(|()| install_dir(&staging.tmp, out, &staging.old));
    // On failure (a full or read-only disk) nothing is left: no temporary folder, and `out` as
    // it was.
    if let Err(e) = written {
        staging.discard();
        return Err(Error::Invalid(format!(
            "cannot export to {}: {e}",
            out.display()
        )));
    }
    Ok(summary(out, tensors.len(), val_loss))
}

/// Refuses a dtype the exported weights cannot have.
fn check_export_dtype(dtype: DType) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
        return Err(Error::Invalid(format!(
            "dtype {dtype:?} is not supported for export (use f32, f16 or bf16)"
        )));
    }
    Ok(())
}

/// Refuses a non-empty destination unless `force` is set.
fn check_destination(out: &Path, force: bool) -> Result<()> {
    if out.exists() {
        let non_empty = std::fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .next()
            .is_some();
        if non_empty && !force {
            return Err(Error::Invalid(format!(
                "{} exists and is not empty; pass --force to replace it",
                out.display()
            )));
        }
    }
    Ok(())
}

/// The checkpoint's model files: `config.json` (as JSON, to be written back, and parsed), the generation settings
/// and the tokenizer.
struct ModelFiles {
    config_json: serde_json::Value,
    config: BartConfig,
    generation: GenerationConfig,
    tokenizer: KoTokenizer,
}

/// Reads and checks the checkpoint's model files.
fn read_model_files(ck: &Path) -> Result<ModelFiles> {
    let config_json = read_json(&ck.join("config.json"))?;
    let config = BartConfig::from_file(&ck.join("config.json"))?;
    let generation = GenerationConfig::from_model_dir(ck, &config)?;
    let tokenizer = KoTokenizer::from_model_dir(ck, &config)?;
    Ok(ModelFiles {
        config_json,
        config,
        generation,
        tokenizer,
    })
}

/// The training settings saved in the checkpoint's `hparams.json`.
fn read_settings(ck: &Path) -> Result<TrainSettings> {
    let hparams = read_json(&ck.join("hparams.json"))?;
    serde_json::from_value(hparams["settings"].clone()).map_err(|e| Error::Config {
        path: ck.join("hparams.json"),
        field: "settings".into(),
        message: e.to_string(),
    })
}

/// The checkpoint's `trainer_state.json`.
fn read_trainer_state(ck: &Path) -> Result<TrainerState> {
    serde_json::from_value(read_json(&ck.join("trainer_state.json"))?).map_err(|e| Error::Config {
        path: ck.join("trainer_state.json"),
        field: "-".into(),
        message: e.to_string(),
    })
}

/// The checkpoint's weights, checked against `config` and converted to `dtype`.
fn read_weights(ck: &Path, config: &BartConfig, dtype: DType) -> Result<HashMap<String, Tensor>> {
    let weights_path = ck.join("model.safetensors");
    let raw = candle_core::safetensors::load(&weights_path, &Device::Cpu).map_err(|e| {
        Error::Weights(format!(
            "{}: cannot read weights: {e}",
            weights_path.display()
        ))
    })?;
    let (tensors, _) = check_tensors(
        raw.into_iter().collect(),
        config,
        dtype,
        &Device::Cpu,
        &weights_path.display().to_string(),
    )?;
    Ok(tensors)
}

/// The validation loss in the checkpoint's folder name, or else the one in its trainer state.
fn checkpoint_val_loss(ck: &Path, state: &TrainerState) -> Option<f64> {
    ck.file_name()
        .and_then(|n| val_loss_of_name(&n.to_string_lossy()))
        .or(state.val_loss)
}

/// Makes the checkpoint's `config.json` what transformers writes for `dtype`.
fn exported_config(config_json: &mut serde_json::Value, ck: &Path, dtype: DType) -> Result<()> {
    let obj = config_json.as_object_mut().ok_or_else(|| Error::Config {
        path: ck.join("config.json"),
        field: "-".into(),
        message: "expected a JSON object".into(),
    })?;
    obj.insert(
        "architectures".into(),
        serde_json::json!(["BartForConditionalGeneration"]),
    );
    obj.insert("dtype".into(), torch_dtype_name(dtype).into());
    obj.remove("torch_dtype");
    obj.entry("model_type").or_insert("bart".into());
    Ok(())
}

/// Where an export is written before it is put in place: `tmp` and `old`, named after the
/// destination and this process, in the destination's parent folder.
struct Staging {
    parent: PathBuf,
    tmp: PathBuf,
    old: PathBuf,
}

impl Staging {
    fn next_to(out: &Path) -> Self {
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = out
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "export".into());
        Staging {
            tmp: parent.join(format!(".tmp-export-{name}-{}", std::process::id())),
            old: parent.join(format!(".old-export-{name}-{}", std::process::id())),
            parent: parent.to_path_buf(),
        }
    }

    /// Creates `tmp` afresh (and the parent folder) and fills it with `fill`.
    fn write(&self, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let (parent, tmp) = (&self.parent, &self.tmp);
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        if tmp.exists() {
            std::fs::remove_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
        }
        std::fs::create_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
        fill(tmp)
    }

    /// Removes `tmp` after a failure; one that cannot be removed is only logged.
    fn discard(&self) {
        if self.tmp.exists() {
            if let Err(r) = std::fs::remove_dir_all(&self.tmp) {
                tracing::warn!("cannot remove {}: {r}", self.tmp.display());
            }
        }
    }
}

/// Writes every exported file into `dir` and syncs them.
fn write_files(
    dir: &Path,
    ck: &Path,
    model: &ModelFiles,
    tensors: &HashMap<String, Tensor>,
    card: &str,
) -> Result<()> {
    write_json(&dir.join("config.json"), &model.config_json)?;
    write_json(
        &dir.join("generation_config.json"),
        &model.generation.to_json(),
    )?;
    save_safetensors(tensors, &dir.join("model.safetensors"))?;
    model.tokenizer.save(dir)?;
    copy_derived_terms(ck, dir)?;
    write_tokenizer_files(dir, &model.tokenizer, &model.config)?;
    std::fs::write(dir.join("README.md"), card).map_err(|e| Error::io(dir.join("README.md"), e))?;
    sync_files(dir)
}

/// The derived terms of grounded decoding travel with the model (checkpoints written before they
/// existed have none).
fn copy_derived_terms(ck: &Path, dir: &Path) -> Result<()> {
    let terms = ck.join(crate::pipeline::DERIVED_TERMS_FILE);
    if terms.is_file() {
        let dest = dir.join(crate::pipeline::DERIVED_TERMS_FILE);
        std::fs::copy(&terms, &dest).map_err(|e| Error::io(&dest, e))?;
    }
    Ok(())
}

/// `special_tokens_map.json` and `tokenizer_config.json`, as `PreTrainedTokenizerFast` reads them.
fn write_tokenizer_files(dir: &Path, tokenizer: &KoTokenizer, config: &BartConfig) -> Result<()> {
    let special = special_tokens_map(tokenizer);
    write_json(
        &dir.join("special_tokens_map.json"),
        &serde_json::Value::Object(special.clone()),
    )?;
    let mut tc = special;
    tc.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    tc.insert(
        "model_max_length".into(),
        config.max_position_embeddings.into(),
    );
    tc.insert("clean_up_tokenization_spaces".into(), false.into());
    write_json(
        &dir.join("tokenizer_config.json"),
        &serde_json::Value::Object(tc),
    )
}

/// The special tokens the tokenizer has, by transformers' key.
fn special_tokens_map(tokenizer: &KoTokenizer) -> serde_json::Map<String, serde_json::Value> {
    let token = |id: Option<u32>| id.and_then(|i| tokenizer.inner().id_to_token(i));
    let sp = tokenizer.special();
    let mut special = serde_json::Map::new();
    for (key, tok) in [
        ("bos_token", token(sp.bos)),
        ("eos_token", token(Some(sp.eos[0]))),
        ("unk_token", token(sp.unk)),
        ("pad_token", token(Some(sp.pad))),
        (
            "mask_token",
            tokenizer
                .inner()
                .token_to_id("<mask>")
                .and_then(|i| tokenizer.inner().id_to_token(i)),
        ),
    ] {
        if let Some(t) = tok {
            special.insert(key.into(), t.into());
        }
    }
    special
}

/// Flushes the exported files to disk before the folder is put in place.
fn sync_files(dir: &Path) -> Result<()> {
    for f in EXPORTED_FILES {
        let p = dir.join(f);
        if let Ok(file) = std::fs::File::open(&p) {
            file.sync_all().map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}

/// What [`export`] reports about the folder it put in place.
fn summary(out: &Path, tensors: usize, val_loss: Option<f64>) -> ExportSummary {
    let weight_bytes = std::fs::metadata(out.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    ExportSummary {
        output_dir: out.to_path_buf(),
        tensors,
        weight_bytes,
        val_loss,
    }
}
