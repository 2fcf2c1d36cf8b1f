//! Helpers shared by kb-core's unit tests.

use candle_core::{DType, Tensor};

/// The largest absolute element-wise difference of two tensors of one shape (any dtypes,
/// compared in f64).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    (f64s(a) - f64s(b))
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}
