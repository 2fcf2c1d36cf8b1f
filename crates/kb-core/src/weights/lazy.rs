//! Weights read one tensor at a time, when the model asks for each, for inference.
//!
//! [`load_checked`](super::load_checked) reads every tensor before the model is built, so the
//! loaded weights are all resident at once. That is what training needs, but for inference each
//! weight matrix is replaced by its packed or int8 form as soon as its layer is built: read
//! lazily, only one layer's loaded weights are held at a time. For KoBART-v1 loaded with
//! `--quantize int8` this lowered the peak resident memory (VmHWM) from 592 MiB (every f32
//! weight, 473 MiB, resident while the int8 copies were made) to the int8 model plus one f32
//! matrix. `model.safetensors` (single or sharded) is mapped and each tensor's pages are released
//! once copied out; `pytorch_model.bin` has no index to read from, so its tensors are read
//! eagerly as before.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::{
    canonical_name, is_safetensors, resolve_tensors, LoadReport, TensorOrigin, WeightFiles,
};
use crate::config::BartConfig;
use crate::error::{Error, Result};

/// A tensor of a mapped safetensors file, not yet read.
#[derive(Debug)]
struct MappedTensor {
    /// Index into [`LazyWeights::maps`].
    map: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Byte range within the mapping.
    start: usize,
    end: usize,
}

/// Where one expected tensor is read from.
#[derive(Debug)]
enum Stored {
    Mapped(MappedTensor),
    /// Already read (`pytorch_model.bin`).
    Read(Tensor),
    /// Zeros of this shape (see [`TensorOrigin::Zeros`]).
    Zeros(Vec<usize>),
}

/// The checked weights of a model folder, each tensor read from its file when first asked for.
///
/// Names, shapes, tied twins and missing tensors are checked from the files' headers when the
/// folder is opened, with the same errors and [`LoadReport`] as
/// [`load_checked`](super::load_checked).
#[derive(Debug)]
pub struct LazyWeights {
    maps: Vec<(memmap2::Mmap, String)>,
    tensors: HashMap<String, Stored>,
    report: LoadReport,
}

impl LazyWeights {
    /// Opens `files` and checks their tensors against `cfg`.
    pub fn open(files: &WeightFiles, cfg: &BartConfig) -> Result<Self> {
        let mut maps = Vec::new();
        let mut found: HashMap<String, Stored> = HashMap::new();
        for file in &files.files {
            let fail =
                |e: String| Error::Weights(format!("{}: cannot read weights: {e}", file.display()));
            if is_safetensors(file) {
                let (mmap, entries) = map_safetensors(file, maps.len()).map_err(fail)?;
                for (name, tensor) in entries {
                    found.insert(canonical_name(&name), Stored::Mapped(tensor));
                }
                maps.push((mmap, file.display().to_string()));
            } else {
                let tensors =
                    candle_core::pickle::read_all(file).map_err(|e| fail(e.to_string()))?;
                for (name, tensor) in tensors {
                    found.insert(canonical_name(&name), Stored::Read(tensor));
                }
            }
        }
        let shapes = found
            .iter()
            .map(|(name, stored)| (name.clone(), stored.shape()))
            .collect();
        let resolution = resolve_tensors(&shapes, cfg, &files.describe())?;
        let mut tensors = HashMap::new();
        for (name, origin) in resolution.origins {
            let stored = match origin {
                // A tied twin stands for model.shared.weight: it is read under that name only.
                TensorOrigin::File(stored) => found
                    .remove(&stored)
                    .expect("resolve_tensors names only tensors it found"),
                TensorOrigin::Zeros(shape) => Stored::Zeros(shape),
            };
            tensors.insert(name, stored);
        }
        Ok(Self {
            maps,
            tensors,
            report: resolution.report,
        })
    }

    /// What opening found besides the expected tensors.
    pub fn report(&self) -> &LoadReport {
        &self.report
    }

    /// A builder that reads each tensor when asked for it, converted to `dtype` on `device`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// Reads tensor `name` in its stored dtype, on the CPU.
    fn read(&self, name: &str) -> candle_core::Result<Tensor> {
        use candle_core::safetensors::Load;

        let Some(stored) = self.tensors.get(name) else {
            candle_core::bail!("no tensor {name} in the checkpoint")
        };
        match stored {
            Stored::Read(t) => Ok(t.clone()),
            Stored::Zeros(shape) => Tensor::zeros(shape.as_slice(), DType::F32, &Device::Cpu),
            Stored::Mapped(m) => {
                let (mmap, file) = &self.maps[m.map];
                let view = safetensors::tensor::TensorView::new(
                    m.dtype,
                    m.shape.clone(),
                    &mmap[m.start..m.end],
                )
                .map_err(|e| candle_core::Error::msg(format!("{file}: tensor {name}: {e}")))?;
                let tensor = view
                    .load(&Device::Cpu)
                    .map_err(|e| candle_core::Error::msg(format!("{file}: tensor {name}: {e}")))?;
                // SAFETY: the bytes belong to this private read-only mapping; dropping their
                // pages only makes a later read of them (this tensor asked for again, or a
                // neighbour sharing a page) fetch them from the file again. `tensor` owns a copy.
                let _ = unsafe {
                    mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        m.start,
                        m.end - m.start,
                    )
                };
                Ok(tensor)
            }
        }
    }
}

impl Stored {
    fn shape(&self) -> Vec<usize> {
        match self {
            Stored::Mapped(m) => m.shape.clone(),
            Stored::Read(t) => t.dims().to_vec(),
            Stored::Zeros(shape) => shape.clone(),
        }
    }
}

impl SimpleBackend for LazyWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, dev)?;
        if tensor.shape() != &s {
            candle_core::bail!(
                "tensor {name}: expected shape {:?}, found {:?}",
                s.dims(),
                tensor.dims()
            );
        }
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.read(name)?.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Maps a safetensors file and lists its tensors (names as stored), checking that each lies
/// within the file.
fn map_safetensors(
    path: &Path,
    map_index: usize,
) -> std::result::Result<(memmap2::Mmap, Vec<(String, MappedTensor)>), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    // SAFETY: the mapping is read-only and private; like every memory-mapped loader (candle's
    // included) it assumes the file is not truncated or rewritten while the model loads.
    let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| e.to_string())?;
    let (header_len, metadata) =
        safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| e.to_string())?;
    let data_start = 8 + header_len;
    let data_len = mmap.len() - data_start;
    let mut out = Vec::new();
    for (name, info) in metadata.tensors() {
        let (begin, end) = info.data_offsets;
        if end > data_len {
            return Err(format!(
                "tensor {name}: its bytes {begin}..{end} lie beyond the file's {data_len} bytes \
                 of data (truncated file?)"
            ));
        }
        out.push((
            name,
            MappedTensor {
                map: map_index,
                dtype: info.dtype,
                shape: info.shape.clone(),
                start: data_start + begin,
                end: data_start + end,
            },
        ));
    }
    Ok((mmap, out))
}
