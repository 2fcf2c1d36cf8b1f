//! Helpers shared by kb-core's integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kb_core::candle_core::{DType, Device, Tensor};

/// `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The golden tensors written by `scripts/make_fixtures.py`.
pub fn golden_tensors() -> HashMap<String, Tensor> {
    kb_core::candle_core::safetensors::load(fixture("golden/logits.safetensors"), &Device::Cpu)
        .expect("golden logits")
}

/// An i64 golden tensor as u32 rows.
pub fn rows_u32(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()
}

/// The device the numerical tests run their models on: `KB_TEST_DEVICE` (`cpu`, `cuda:N`),
/// default `cpu`. With a CUDA build on a GPU machine, `KB_TEST_DEVICE=cuda:0` runs the same
/// parity checks against transformers on the GPU.
pub fn test_device() -> Device {
    let spec = std::env::var("KB_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    kb_core::parse_device(&spec).expect("KB_TEST_DEVICE")
}

/// Largest absolute difference between two tensors of the same shape (on any devices).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Copies a fixture folder into a temp dir, leaving out files for which `skip` is true.
pub fn copy_fixture(name: &str, skip: impl Fn(&str) -> bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        let file = entry.file_name().to_string_lossy().to_string();
        if !skip(&file) {
            std::fs::copy(entry.path(), dir.path().join(&file)).unwrap();
        }
    }
    dir
}
pub mod torch_bin;
