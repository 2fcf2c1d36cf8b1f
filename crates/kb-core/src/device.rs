//! Where and in what number format a model runs: the names the command-line tools and the
//! server accept for dtypes and devices.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Parses a dtype name as the command-line tools accept it.
pub fn parse_dtype(s: &str) -> std::result::Result<DType, String> {
    match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(format!(
            "unsupported dtype `{other}` (use f32, f16 or bf16)"
        )),
    }
}

/// Picks a device: `cpu`, `cuda` or `cuda:N` (the latter need the `cuda` feature).
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(|n| {
                    n.parse::<usize>()
                        .map_err(|_| Error::Invalid(format!("bad device `{s}`: expected cuda:N")))
                })
                .transpose()?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                return Err(Error::Invalid(format!(
                    "device `{s}` needs a build with CUDA: rebuild with `cargo build --release --features cuda`"
                )));
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        _ => Err(Error::Invalid(format!(
            "unknown device `{s}` (use cpu, cuda or cuda:N)"
        ))),
    }
}
