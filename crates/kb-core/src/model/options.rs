//! How a loaded model is prepared for inference: the storage of its weight matrices
//! ([`Quantization`]) and the number format of its decoder's key/value caches.

use candle_core::DType;

/// How the weight matrices of the linear layers and the token embedding / LM head are stored
/// for inference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Quantization {
    /// As loaded (f32 on the CPU: packed for the product kernel, [`super::packed`]).
    #[default]
    None,
    /// int8 on the CPU ([`super::quantized`]): per-output-row symmetric int8 weights, activations
    /// quantized to 8 bits (255 levels) per row at each product, i32 sums. Every linear layer and the token
    /// embedding / LM head; layer norms, softmax and attention stay in floating point. About a
    /// quarter of the f32 weights' memory.
    Int8,
}

impl Quantization {
    /// Every value, as [`Quantization::name`] spells them.
    pub const ALL: [Quantization; 2] = [Quantization::None, Quantization::Int8];

    /// The name the command-line tools accept (`none`, `int8`).
    pub fn name(self) -> &'static str {
        match self {
            Quantization::None => "none",
            Quantization::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Quantization {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Ok(Quantization::None),
            "int8" | "i8" => Ok(Quantization::Int8),
            other => Err(format!("unknown quantization `{other}` (use none or int8)")),
        }
    }
}

/// Whether `dtype` can hold a key/value cache (f32, f16 or bf16).
pub fn is_cache_dtype(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for q in Quantization::ALL {
            assert_eq!(q.name().parse::<Quantization>().unwrap(), q);
            assert_eq!(q.to_string(), q.name());
        }
        assert_eq!(
            " INT8 ".parse::<Quantization>().unwrap(),
            Quantization::Int8
        );
        let e = "int4".parse::<Quantization>().unwrap_err();
        assert!(e.contains("none or int8"), "{e}");
    }
}
