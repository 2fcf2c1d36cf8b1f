//! Frozen linear layers on the CPU: `y = x Wᵀ + b` as independent single-threaded products over
//! slices of the output features, one per task of rayon's pool, with the bias as the products'
//! starting value.
//!
//! candle's CPU matrix multiply hands one product to its GEMM (the `gemm` crate) with that
//! crate's own multi-threading. At decoding shapes (80 rows — 16 queries × 5 beams — of 768 or
//! 3072 features) that threading barely helps: measured on 2 cores, 80 × 3072 → 768 ran at
//! 67 GFLOP/s threaded and 73 GFLOP/s on one thread. Splitting the output features into
//! independent products keeps every core busy on its own slice with no synchronisation inside
//! the product: a decoding step of 16 queries × 5 beams measured ~20% faster. With a few rows
//! (one query's beams) candle's weight-first product stays faster, so callers use this above
//! [`super::layers::WEIGHT_FIRST_MAX_ROWS`] rows. The weight may be any strided 2-D view.
//!
//! The sums run in a different order than candle's product and the bias is added first rather
//! than last, so results differ from candle's by float rounding (≈1e-6 relative).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Output features per slice are rounded to a multiple of this (the GEMM's register tiles).
const SLICE_ALIGN: usize = 16;

/// Whether [`linear`] can compute `x Wᵀ` for `x` and `weight` (both f32 on the CPU).
pub fn applies(x: &Tensor, weight: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu)
        && matches!(weight.device(), Device::Cpu)
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
}

/// `x Wᵀ (+ bias)` for `x` `(rows, in)` and `weight` `(out, in)` (any strides), `bias` `out`
/// values. Inference only: no gradient flows through it.
pub fn linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<Arc<[f32]>>,
) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(weight, &CpuLinear { bias })
}

/// [`linear`] returning the `rows × out` result as host values (row-major) instead of a
/// tensor: no copy of the result, for a consumer that reads it on the host (the decoder's
/// vocabulary logits, read by the search every step).
pub fn linear_to_host(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&[f32]>,
) -> candle_core::Result<Vec<f32>> {
    let x = x.contiguous()?;
    let (x_storage, x_layout) = x.storage_and_layout();
    let (w_storage, w_layout) = weight.storage_and_layout();
    match (&*x_storage, &*w_storage) {
        (Storage::Cpu(xs), Storage::Cpu(ws)) => product(xs, x_layout, ws, w_layout, bias),
        _ => candle_core::bail!("cpu linear: tensors must be on the CPU"),
    }
}

struct CpuLinear {
    bias: Option<Arc<[f32]>>,
}

/// A raw output pointer shared by tasks that write disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes only its own columns of the output (see `cpu_fwd`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer `offset` elements further (taking `self` whole, so that closures capture
    /// the `Send` wrapper rather than its raw field).
    fn add(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

fn f32_data<'a>(storage: &'a CpuStorage, what: &str) -> candle_core::Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(d) => Ok(d),
        other => candle_core::bail!("cpu linear: {what} must be f32, got {:?}", other.dtype()),
    }
}

impl CustomOp2 for CpuLinear {
    fn name(&self) -> &'static str {
        "cpu-linear"
    }

    fn cpu_fwd(
        &self,
        x_storage: &CpuStorage,
        x_layout: &Layout,
        w_storage: &CpuStorage,
        w_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let y = product(
            x_storage,
            x_layout,
            w_storage,
            w_layout,
            self.bias.as_deref(),
        )?;
        let shape = Shape::from((x_layout.dims()[0], w_layout.dims()[0]));
        Ok((CpuStorage::F32(y), shape))
    }
}

/// `x Wᵀ (+ bias)` from CPU storages (see [`linear`]).
fn product(
    x_storage: &CpuStorage,
    x_layout: &Layout,
    w_storage: &CpuStorage,
    w_layout: &Layout,
    bias: Option<&[f32]>,
) -> candle_core::Result<Vec<f32>> {
    let (rows, features) = x_layout.shape().dims2()?;
    let (outputs, w_features) = w_layout.shape().dims2()?;
    if features != w_features {
        candle_core::bail!(
            "cpu linear: input {:?} does not match weight {:?}",
            x_layout.shape(),
            w_layout.shape()
        );
    }
    if let Some(b) = &bias {
        if b.len() != outputs {
            candle_core::bail!("cpu linear: {} bias values for {outputs} outputs", b.len());
        }
    }
    if !x_layout.is_contiguous() {
        candle_core::bail!("cpu linear: the input must be contiguous");
    }
    let x = &f32_data(x_storage, "input")?[x_layout.start_offset()..][..rows * features];
    let w = f32_data(w_storage, "weight")?;
    let (w_out_stride, w_in_stride) = (w_layout.stride()[0], w_layout.stride()[1]);
    let w0 = w_layout.start_offset();
    if outputs > 0 && features > 0 {
        let last = w0 + (outputs - 1) * w_out_stride + (features - 1) * w_in_stride;
        if last >= w.len() {
            candle_core::bail!("cpu linear: the weight view runs past its storage");
        }
    }

    let mut y = match &bias {
        Some(b) => b.repeat(rows),
        None => vec![0f32; rows * outputs],
    };
    if rows == 0 || outputs == 0 {
        return Ok(y);
    }
    let slices = 2 * rayon::current_num_threads();
    let width = outputs
        .div_ceil(slices)
        .next_multiple_of(SLICE_ALIGN)
        .min(outputs);
    let out = OutPtr(y.as_mut_ptr());
    let read_dst = bias.is_some();
    (0..outputs.div_ceil(width)).into_par_iter().for_each(|s| {
        let (c0, c1) = (s * width, ((s + 1) * width).min(outputs));
        // SAFETY: `y` is `rows × outputs` row-major and outlives the loop; this task writes
        // only columns `c0..c1` of it. `x` holds `rows × features` values and the weight
        // view was checked to lie within its storage above; the GEMM reads weight element
        // (i, j) — output c0 + j, input i — at `w0 + (c0 + j)·w_out_stride + i·w_in_stride`.
        unsafe {
            gemm::gemm(
                rows,
                c1 - c0,
                features,
                out.add(c0),
                1,
                outputs as isize,
                read_dst,
                x.as_ptr(),
                1,
                features as isize,
                w.as_ptr().add(w0 + c0 * w_out_stride),
                w_out_stride as isize,
                w_in_stride as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_abs_diff;

    /// The largest difference relative to the largest magnitude of `b`.
    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        max_abs_diff(a, b) / scale as f64
    }

    /// Every weight layout the model uses — `(out, in)` row-major, its `(in, out)` transpose
    /// seen as `(out, in)`, and a column slice of a wider transposed matrix (a fused q/k/v
    /// part) — against candle's `x Wᵀ + b`, for row counts from one query to a batch.
    #[test]
    fn matches_candle_matmul_for_every_weight_layout() {
        let dev = Device::Cpu;
        let (features, outputs) = (48, 200);
        let w = Tensor::randn(0f32, 1.0, (outputs, features), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, outputs, &dev).unwrap();
        let host_bias: Arc<[f32]> = b.to_vec1::<f32>().unwrap().into();
        let transposed = w.t().unwrap().contiguous().unwrap().t().unwrap();
        let wide = Tensor::cat(&[&w, &w, &w], 0)
            .unwrap()
            .t()
            .unwrap()
            .contiguous()
            .unwrap()
            .t()
            .unwrap()
            .narrow(0, outputs, outputs)
            .unwrap();
        for rows in [1, 5, 17, 80] {
            let x = Tensor::randn(0f32, 1.0, (rows, features), &dev).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let want_b = want.broadcast_add(&b).unwrap();
            for weight in [&w, &transposed, &wide] {
                let got = linear(&x, weight, None).unwrap();
                assert_eq!(got.dims(), &[rows, outputs]);
                assert!(max_rel_diff(&got, &want) < 1e-5, "rows {rows}");
                let got = linear(&x, weight, Some(host_bias.clone())).unwrap();
                assert!(max_rel_diff(&got, &want_b) < 1e-5, "rows {rows} with bias");
                let host = linear_to_host(&x, weight, Some(&host_bias)).unwrap();
                assert_eq!(host, got.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((3, 8), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((5, 7), DType::F32, &dev).unwrap();
        assert!(linear(&x, &w, None).is_err());
        let w = Tensor::zeros((5, 8), DType::F32, &dev).unwrap();
        assert!(linear(&x, &w, Some(vec![0.0; 4].into())).is_err());
        let y = linear(&x, &w, Some(vec![1.0; 5].into())).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![1.0; 5]; 3]);
        let empty = Tensor::zeros((0, 8), DType::F32, &dev).unwrap();
        assert_eq!(linear(&empty, &w, None).unwrap().dims(), &[0, 5]);
    }
}
