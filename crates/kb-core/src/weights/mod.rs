//! Reading model weights from a Hugging Face model folder.
//!
//! Accepts `model.safetensors`, a sharded `model.safetensors.index.json`, `pytorch_model.bin`
//! (what the hub's `gogamza/kobart-base-v1` ships) and a sharded `pytorch_model.bin.index.json`.
//! Tensor names are canonicalised to transformers' `BartForConditionalGeneration` names (names
//! saved from a bare `BartModel` lack the `model.` prefix), tied embeddings missing from the file
//! are recovered from their twins as transformers does, and every expected tensor is checked for
//! presence and shape before the model is built.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::BartConfig;
use crate::error::{Error, Result};

mod lazy;

pub use lazy::LazyWeights;

/// The on-disk weight layouts we read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// `model.safetensors`.
    Safetensors,
    /// `model.safetensors.index.json` and its shards.
    ShardedSafetensors,
    /// `pytorch_model.bin` (PyTorch zip pickle).
    PytorchBin,
    /// `pytorch_model.bin.index.json` and its shards.
    ShardedPytorchBin,
}

/// The weight files of a model folder, in the order transformers prefers them.
#[derive(Debug, Clone)]
pub struct WeightFiles {
    /// Layout.
    pub format: WeightFormat,
    /// Files to read (one, or the shards).
    pub files: Vec<PathBuf>,
}

/// File names that may hold weights, most preferred first.
pub const WEIGHT_FILE_NAMES: [&str; 4] = [
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
];

impl WeightFiles {
    /// The files, comma-separated, for error messages.
    pub fn describe(&self) -> String {
        self.files
            .iter()
            .map(|f| f.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Finds the weights in `dir`.
    pub fn find(dir: &Path) -> Result<Self> {
        let formats = [
            WeightFormat::Safetensors,
            WeightFormat::ShardedSafetensors,
            WeightFormat::PytorchBin,
            WeightFormat::ShardedPytorchBin,
        ];
        for (name, format) in WEIGHT_FILE_NAMES.iter().zip(formats) {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let files = match format {
                WeightFormat::Safetensors | WeightFormat::PytorchBin => vec![path],
                _ => shard_files(&path)?,
            };
            return Ok(Self { format, files });
        }
        Err(Error::Weights(format!(
            "no weights in {}: expected one of {}",
            dir.display(),
            WEIGHT_FILE_NAMES.join(", ")
        )))
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index = serde_json::from_str(&text).map_err(|e| {
        Error::Weights(format!(
            "{}: not a valid weight index: {e}",
            index.display()
        ))
    })?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = parsed.weight_map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    for f in &files {
        if !f.is_file() {
            return Err(Error::Weights(format!(
                "{} names shard {}, which does not exist",
                index.display(),
                f.display()
            )));
        }
    }
    Ok(files)
}

/// What loading found besides the expected tensors.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Tensors absent from the files and filled in the way transformers fills them
    /// (tied embeddings from their twin, `final_logits_bias` with zeros).
    pub filled: Vec<String>,
    /// Tensors in the files that the model does not use (transformers warns about these too).
    pub unexpected: Vec<String>,
}

impl LoadReport {
    /// A one-paragraph human summary (empty when there is nothing to say).
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.filled.is_empty() {
            parts.push(format!(
                "filled as transformers does: {}",
                self.filled.join(", ")
            ));
        }
        if !self.unexpected.is_empty() {
            parts.push(format!(
                "unused tensors in the checkpoint: {}",
                self.unexpected.join(", ")
            ));
        }
        parts.join("; ")
    }
}

/// Every tensor `BartForConditionalGeneration` needs for `cfg`, with its shape, named as in the
/// `model.safetensors` transformers writes (tied copies omitted, `lm_head.weight` only when untied).
pub fn expected_tensors(cfg: &BartConfig) -> Vec<(String, Vec<usize>)> {
    let d = cfg.d_model;
    let mut out: Vec<(String, Vec<usize>)> = vec![
        ("model.shared.weight".into(), vec![cfg.vocab_size, d]),
        ("final_logits_bias".into(), vec![1, cfg.vocab_size]),
    ];
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![cfg.vocab_size, d]));
    }
    let norm = |out: &mut Vec<(String, Vec<usize>)>, name: String| {
        out.push((format!("{name}.weight"), vec![d]));
        out.push((format!("{name}.bias"), vec![d]));
    };
    let lin = |out: &mut Vec<(String, Vec<usize>)>, name: String, o: usize, i: usize| {
        out.push((format!("{name}.weight"), vec![o, i]));
        out.push((format!("{name}.bias"), vec![o]));
    };
    for (stack, layers, ffn) in [
        ("encoder", cfg.encoder_layers, cfg.encoder_ffn_dim),
        ("decoder", cfg.decoder_layers, cfg.decoder_ffn_dim),
    ] {
        let p = format!("model.{stack}");
        out.push((
            format!("{p}.embed_positions.weight"),
            vec![cfg.position_table_rows(), d],
        ));
        if cfg.normalize_embedding {
            norm(&mut out, format!("{p}.layernorm_embedding"));
        }
        for i in 0..layers {
            let l = format!("{p}.layers.{i}");
            let mut attn = vec!["self_attn"];
            if stack == "decoder" {
                attn.push("encoder_attn");
            }
            for a in attn {
                for proj in ["k_proj", "v_proj", "q_proj", "out_proj"] {
                    lin(&mut out, format!("{l}.{a}.{proj}"), d, d);
                }
                norm(&mut out, format!("{l}.{a}_layer_norm"));
            }
            lin(&mut out, format!("{l}.fc1"), ffn, d);
            lin(&mut out, format!("{l}.fc2"), d, ffn);
            norm(&mut out, format!("{l}.final_layer_norm"));
        }
        if cfg.final_layer_norm() {
            norm(&mut out, format!("{p}.layer_norm"));
        }
    }
    out
}

/// Maps a checkpoint tensor name to transformers' `BartForConditionalGeneration` name.
pub fn canonical_name(name: &str) -> String {
    if name.starts_with("model.") || name == "final_logits_bias" || name.starts_with("lm_head.") {
        name.to_string()
    } else {
        format!("model.{name}")
    }
}

/// Reads every tensor of the weight files (on the CPU, in their stored dtype).
pub fn read_tensors(files: &WeightFiles) -> Result<Vec<(String, Tensor)>> {
    let mut all = Vec::new();
    for file in &files.files {
        let tensors = if is_safetensors(file) {
            read_safetensors(file)
        } else {
            candle_core::pickle::read_all(file).map_err(|e| e.to_string())
        }
        .map_err(|e| Error::Weights(format!("{}: cannot read weights: {e}", file.display())))?;
        all.extend(tensors);
    }
    Ok(all)
}

/// Whether `path` is a safetensors file (by its extension, as transformers decides).
fn is_safetensors(path: &Path) -> bool {
    path.extension()
        .map(|e| e == "safetensors")
        .unwrap_or(false)
}

/// Reads a safetensors file tensor by tensor, holding at most one tensor's bytes of the file
/// in memory besides the tensors read so far.
///
/// Reading the whole file first (as `candle_core::safetensors::load` does) holds a second copy
/// of every weight until the end: the peak resident memory of loading KoBART-v1 in f32 was twice
/// its weights (~950 MiB). Here the file is mapped, each tensor is copied out in file order, and
/// its pages are released from the mapping (`MADV_DONTNEED`) before the next one is read.
fn read_safetensors(path: &Path) -> std::result::Result<Vec<(String, Tensor)>, String> {
    use candle_core::safetensors::Load;
    use safetensors::SafeTensors;

    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    // SAFETY: the mapping is read-only and private; like every memory-mapped loader (candle's
    // included) it assumes the file is not truncated or rewritten while the model loads.
    let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| e.to_string())?;
    // Pages are read once, in order: let the kernel read ahead.
    let _ = mmap.advise(memmap2::Advice::Sequential);
    let st = SafeTensors::deserialize(&mmap).map_err(|e| e.to_string())?;
    let base = mmap.as_ptr() as usize;
    let mut views = st.tensors();
    views.sort_by_key(|(_, view)| view.data().as_ptr() as usize);
    let mut out = Vec::with_capacity(views.len());
    for (name, view) in views {
        let tensor = view
            .load(&Device::Cpu)
            .map_err(|e| format!("tensor {name}: {e}"))?;
        let (offset, len) = (view.data().as_ptr() as usize - base, view.data().len());
        // SAFETY: `view` borrows bytes of this private read-only mapping; dropping their pages
        // only makes a later access read them from the file again, and nothing reads them again:
        // `tensor` owns a copy and the next views lie after this one.
        let _ =
            unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
        out.push((name, tensor));
    }
    Ok(out)
}

/// Reads, canonicalises and checks the weights for `cfg`, converting them to `dtype` on `device`.
///
/// Errors name every missing tensor and any tensor with a wrong shape.
pub fn load_checked(
    files: &WeightFiles,
    cfg: &BartConfig,
    dtype: DType,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, LoadReport)> {
    let raw = read_tensors(files)?;
    check_tensors(raw, cfg, dtype, device, &files.describe())
}

/// Canonicalises and checks already-read tensors (see [`load_checked`]); `source` names the
/// checkpoint in error messages.
pub fn check_tensors(
    raw: Vec<(String, Tensor)>,
    cfg: &BartConfig,
    dtype: DType,
    device: &Device,
    source: &str,
) -> Result<(HashMap<String, Tensor>, LoadReport)> {
    let mut found: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in raw {
        found.insert(canonical_name(&name), t);
    }
    let shapes = found
        .iter()
        .map(|(name, t)| (name.clone(), t.dims().to_vec()))
        .collect();
    let resolution = resolve_tensors(&shapes, cfg, source)?;
    let mut out = HashMap::new();
    for (name, origin) in resolution.origins {
        let t = match origin {
            TensorOrigin::File(stored) => found[&stored].clone(),
            TensorOrigin::Zeros(shape) => Tensor::zeros(shape, DType::F32, &Device::Cpu)?,
        };
        out.insert(name, t.to_dtype(dtype)?.to_device(device)?);
    }
    Ok((out, resolution.report))
}

/// Where an expected tensor's values come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TensorOrigin {
    /// The checkpoint tensor of this canonical name (the tensor itself or its tied twin).
    File(String),
    /// Zeros of this shape (a missing `final_logits_bias`, as transformers fills it).
    Zeros(Vec<usize>),
}

/// The outcome of matching a checkpoint's tensor names and shapes against the config.
#[derive(Debug, Clone)]
pub(crate) struct Resolution {
    /// Every expected tensor (see [`expected_tensors`]) with its origin.
    pub origins: Vec<(String, TensorOrigin)>,
    /// What was filled in and what is left unused.
    pub report: LoadReport,
}

/// Decides, from names and shapes alone, where every tensor `cfg` needs comes from.
///
/// `found` maps canonical checkpoint names (see [`canonical_name`]) to shapes. Errors name every
/// missing tensor and any tensor with a wrong shape; `source` names the checkpoint in them.
pub(crate) fn resolve_tensors(
    found: &HashMap<String, Vec<usize>>,
    cfg: &BartConfig,
    source: &str,
) -> Result<Resolution> {
    let mut report = LoadReport::default();
    let mut unused: std::collections::HashSet<&str> = found.keys().map(String::as_str).collect();

    // Tied embeddings: transformers ties encoder/decoder embed_tokens (and lm_head when
    // tie_word_embeddings) to model.shared, whichever of them the file holds.
    let mut twins = vec![
        "model.encoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight",
    ];
    if cfg.tie_word_embeddings {
        twins.push("lm_head.weight");
    }
    let mut shared_from = "model.shared.weight";
    if !found.contains_key(shared_from) {
        if let Some(twin) = twins.iter().find(|t| found.contains_key(**t)) {
            shared_from = twin;
            report
                .filled
                .push(format!("model.shared.weight (from {twin})"));
        }
    }
    for twin in &twins {
        unused.remove(*twin);
    }
    // Zeros of `vocab_size` only for an embedding of that many rows: `vocab_size` is what the
    // config says, and a wrong (say, astronomical) one is reported below as the embedding's
    // shape, not allocated.
    let shared_rows = found.get(shared_from).and_then(|s| s.first().copied());
    let fill_logits_bias =
        !found.contains_key("final_logits_bias") && shared_rows == Some(cfg.vocab_size);
    if fill_logits_bias {
        report.filled.push("final_logits_bias (zeros)".into());
    }

    let mut missing = Vec::new();
    let mut wrong = Vec::new();
    let mut origins = Vec::new();
    for (name, shape) in expected_tensors(cfg) {
        let stored = if name == "model.shared.weight" {
            shared_from.to_string()
        } else {
            name.clone()
        };
        unused.remove(stored.as_str());
        match found.get(&stored) {
            None if name == "final_logits_bias" && fill_logits_bias => {
                origins.push((name, TensorOrigin::Zeros(shape)));
            }
            None => missing.push(name),
            Some(dims) if *dims != shape => {
                wrong.push(format!("{name}: expected shape {shape:?}, found {dims:?}"))
            }
            Some(_) => origins.push((name, TensorOrigin::File(stored))),
        }
    }
    if !wrong.is_empty() {
        return Err(Error::Weights(format!(
            "{source}: tensors do not match config.json: {}",
            wrong.join("; ")
        )));
    }
    if !missing.is_empty() {
        let shown: Vec<_> = missing.iter().take(8).cloned().collect();
        let more = if missing.len() > shown.len() {
            format!(" and {} more", missing.len() - shown.len())
        } else {
            String::new()
        };
        return Err(Error::Weights(format!(
            "{source}: missing tensor(s) {}{more}",
            shown.join(", ")
        )));
    }
    let mut unexpected: Vec<String> = unused.into_iter().map(String::from).collect();
    unexpected.sort();
    report.unexpected = unexpected;
    Ok(Resolution { origins, report })
}

/// Writes tensors as `model.safetensors` the way transformers does: names sorted, with the
/// `{"format": "pt"}` metadata that `from_pretrained` checks.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize_to_file(cpu, Some(metadata), path)
        .map_err(|e| Error::Weights(format!("cannot write {}: {e}", path.display())))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_abs_diff;

    #[test]
    fn safetensors_are_read_tensor_by_tensor_exactly_as_candle_reads_them() {
        let dev = Device::Cpu;
        let mut tensors = HashMap::new();
        // Several dtypes and sizes spanning pages, so that released page ranges overlap.
        tensors.insert(
            "a".to_string(),
            Tensor::randn(0f32, 1.0, (3, 5000), &dev).unwrap(),
        );
        tensors.insert(
            "b".to_string(),
            Tensor::randn(0f32, 1.0, 7, &dev)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap(),
        );
        tensors.insert(
            "c".to_string(),
            Tensor::randn(0f32, 1.0, (2, 1500), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap(),
        );
        tensors.insert("d".to_string(), Tensor::arange(0i64, 9, &dev).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();

        let read = read_safetensors(&path).unwrap();
        let want = candle_core::safetensors::load(&path, &dev).unwrap();
        assert_eq!(read.len(), want.len());
        for (name, t) in &read {
            let w = &want[name];
            assert_eq!(t.dtype(), w.dtype(), "{name}");
            assert_eq!(t.dims(), w.dims(), "{name}");
            assert_eq!(max_abs_diff(t, w), 0.0, "{name}");
        }

        // A truncated file is an error, not a partial read.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        assert!(read_safetensors(&path).is_err());
    }
}
