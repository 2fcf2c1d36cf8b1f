//! Attention for one new decoder position per row, fused into one CPU kernel.
//!
//! At a decoding step every row has a single query. Done with candle's batched matmul and
//! softmax, that is two tiny matrix products per (row, head) — thousands of library calls per
//! step for a beam-search batch, dominated by call overhead — plus the score and probability
//! tensors in between. This kernel computes, per row and head, the scores against the cached
//! keys, an additive mask, the softmax and the weighted sum of values in one pass, in parallel
//! over groups of rows that share keys/values (an input's beams in cross-attention: each key is
//! read once for the group), vectorised with AVX2 + FMA where the CPU has them
//! ([`crate::vector_math`]). It reads the keys/values through their strides, so the views of
//! the preallocated self-attention cache are used without copies. Numerically it is the same
//! computation (f32 accumulation; the order of additions differs from a matrix product's, and
//! the exponential is [`crate::vector_math::exp`], within 2 ulp).
//!
//! Keys and values may be stored in f16 or bf16 (a smaller key/value cache, see
//! [`super::kv_cache`]): each head's keys, then its values, are widened to f32 into a per-thread
//! buffer with the vectorised conversions of [`crate::vector_math`] (F16C for f16, shifts for
//! bf16) just before they are used — once per group of queries that share them — and the
//! arithmetic stays f32.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::vector_math as vm;

/// Whether [`attend_single_query`] can run here: f32 queries on the CPU (keys and values may be
/// f32, f16 or bf16).
pub fn applies(q: &Tensor) -> bool {
    matches!(q.device(), Device::Cpu) && q.dtype() == DType::F32
}

/// Attention output `(rows, heads · head_dim)` for queries `q` `(rows, heads · head_dim)`
/// (already scaled) over `keys`/`values` `(kv_rows, heads, len, head_dim)` (f32, f16 or bf16,
/// both the same; any strides with a contiguous last dimension), query row `r` reading
/// key/value row `r / group`. `mask`, when given, is additive, `kv_rows × len` values
/// (row-major), added to the scores.
pub fn attend_single_query(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    mask: Option<Arc<[f32]>>,
    group: usize,
) -> candle_core::Result<Tensor> {
    q.contiguous()?
        .apply_op3_no_bwd(keys, values, &SingleQueryAttention { mask, group })
}

struct SingleQueryAttention {
    mask: Option<Arc<[f32]>>,
    group: usize,
}

fn f32_data<'a>(storage: &'a CpuStorage, what: &str) -> candle_core::Result<&'a [f32]> {
    match storage {
        CpuStorage::F32(d) => Ok(d),
        other => candle_core::bail!(
            "single-query attention: {what} must be f32, got {:?}",
            other.dtype()
        ),
    }
}

/// The storage of keys or values.
#[derive(Clone, Copy)]
enum Stored<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl<'a> Stored<'a> {
    fn of(storage: &'a CpuStorage, what: &str) -> candle_core::Result<Self> {
        Ok(match storage {
            CpuStorage::F32(d) => Stored::F32(d),
            CpuStorage::F16(d) => Stored::F16(d),
            CpuStorage::BF16(d) => Stored::Bf16(d),
            other => candle_core::bail!(
                "single-query attention: {what} must be f32, f16 or bf16, got {:?}",
                other.dtype()
            ),
        })
    }

    fn dtype(self) -> DType {
        match self {
            Stored::F32(_) => DType::F32,
            Stored::F16(_) => DType::F16,
            Stored::Bf16(_) => DType::BF16,
        }
    }

    /// The `len` vectors of `hd` values at `base + j·stride` as f32: `(values, base, stride)`
    /// to read vector `j` at `values[base + j·stride..][..hd]`. f32 storage is read in place;
    /// f16 and bf16 are widened into `buffer` (`len × hd` values), in one conversion when the
    /// vectors are contiguous.
    #[inline(always)]
    fn as_f32<'b>(
        self,
        base: usize,
        stride: usize,
        len: usize,
        hd: usize,
        buffer: &'b mut [f32],
    ) -> (&'b [f32], usize, usize)
    where
        'a: 'b,
    {
        fn widen<T>(
            src: &[T],
            base: usize,
            stride: usize,
            len: usize,
            hd: usize,
            buffer: &mut [f32],
            convert: fn(&[T], &mut [f32]),
        ) {
            let buffer = &mut buffer[..len * hd];
            if stride == hd {
                convert(&src[base..][..len * hd], buffer);
            } else {
                for (j, out) in buffer.chunks_exact_mut(hd).enumerate() {
                    convert(&src[base + j * stride..][..hd], out);
                }
            }
        }
        match self {
            Stored::F32(d) => (d, base, stride),
            Stored::F16(d) => {
                widen(d, base, stride, len, hd, buffer, vm::f16_to_f32_slice);
                (buffer, 0, hd)
            }
            Stored::Bf16(d) => {
                widen(d, base, stride, len, hd, buffer, vm::bf16_to_f32_slice);
                (buffer, 0, hd)
            }
        }
    }
}

/// What the per-group kernel reads: queries, the key/value storage with its strides, the mask.
struct Operands<'a> {
    q: &'a [f32],
    k: Stored<'a>,
    v: Stored<'a>,
    /// Offsets and strides (row, head, position) of keys and values in their storage.
    k0: usize,
    v0: usize,
    ks: [usize; 3],
    vs: [usize; 3],
    heads: usize,
    len: usize,
    head_dim: usize,
    group: usize,
    mask: Option<&'a [f32]>,
}

/// Per-thread buffers of the kernel.
struct Scratch {
    /// `group × len` scores.
    scores: Vec<f32>,
    /// One head's keys or values widened to f32 (`len × head_dim`; empty for f32 storage).
    widened: Vec<f32>,
}

/// Attention of the `group` queries that read key/value row `kr`: `scratch` has room for
/// `group × len` scores (and, for f16/bf16 storage, `len × head_dim` widened values), `out`
/// (the group's `group × heads·head_dim` outputs) starts zeroed. Each key and value vector is
/// read (and widened) once for the whole group (the beams of one input share their
/// cross-attention keys/values).
#[inline(always)]
fn attend_group_body(ops: &Operands<'_>, kr: usize, scratch: &mut Scratch, out: &mut [f32]) {
    let (len, hd, group) = (ops.len, ops.head_dim, ops.group);
    let dim = ops.heads * hd;
    let mask = ops.mask.map(|m| &m[kr * len..(kr + 1) * len]);
    let queries = &ops.q[kr * group * dim..][..group * dim];
    let Scratch { scores, widened } = scratch;
    for h in 0..ops.heads {
        let base = ops.k0 + kr * ops.ks[0] + h * ops.ks[1];
        let (keys, kbase, kstride) = ops.k.as_f32(base, ops.ks[2], len, hd, widened);
        for j in 0..len {
            let kj = &keys[kbase + j * kstride..][..hd];
            let m = mask.map_or(0.0, |m| m[j]);
            for g in 0..group {
                scores[g * len + j] = vm::dot(&queries[g * dim + h * hd..][..hd], kj) + m;
            }
        }
        for g in 0..group {
            vm::softmax_body(&mut scores[g * len..][..len]);
        }
        let base = ops.v0 + kr * ops.vs[0] + h * ops.vs[1];
        let (values, vbase, vstride) = ops.v.as_f32(base, ops.vs[2], len, hd, widened);
        for j in 0..len {
            let vj = &values[vbase + j * vstride..][..hd];
            for g in 0..group {
                vm::axpy(&mut out[g * dim + h * hd..][..hd], scores[g * len + j], vj);
            }
        }
    }
}

vm::dispatched! {
    /// [`attend_group_body`], vectorised for the CPU it runs on.
    fn attend_group(ops: &Operands<'_>, kr: usize, scratch: &mut Scratch, out: &mut [f32]) = attend_group_body;
}

impl CustomOp3 for SingleQueryAttention {
    fn name(&self) -> &'static str {
        "single-query-attention"
    }

    fn cpu_fwd(
        &self,
        q_storage: &CpuStorage,
        q_layout: &Layout,
        k_storage: &CpuStorage,
        k_layout: &Layout,
        v_storage: &CpuStorage,
        v_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, dim) = q_layout.shape().dims2()?;
        let (kv_rows, heads, len, head_dim) = k_layout.shape().dims4()?;
        if v_layout.shape() != k_layout.shape() {
            candle_core::bail!(
                "single-query attention: keys {:?} and values {:?} differ in shape",
                k_layout.shape(),
                v_layout.shape()
            );
        }
        if heads * head_dim != dim || self.group == 0 || rows != kv_rows * self.group {
            candle_core::bail!(
                "single-query attention: queries {:?} do not match keys {:?} in groups of {}",
                q_layout.shape(),
                k_layout.shape(),
                self.group
            );
        }
        if k_layout.stride()[3] != 1 || v_layout.stride()[3] != 1 {
            candle_core::bail!("single-query attention: keys/values need a contiguous last dim");
        }
        if let Some(m) = &self.mask {
            if m.len() != kv_rows * len {
                candle_core::bail!(
                    "single-query attention: mask has {} values for {kv_rows} × {len} keys",
                    m.len()
                );
            }
        }
        if len == 0 {
            candle_core::bail!("single-query attention over no keys");
        }
        let (k, v) = (
            Stored::of(k_storage, "keys")?,
            Stored::of(v_storage, "values")?,
        );
        if k.dtype() != v.dtype() {
            candle_core::bail!(
                "single-query attention: keys ({:?}) and values ({:?}) differ in dtype",
                k.dtype(),
                v.dtype()
            );
        }
        let widened = if k.dtype() == DType::F32 {
            0
        } else {
            len * head_dim
        };
        let ops = Operands {
            q: &f32_data(q_storage, "queries")?[q_layout.start_offset()..][..rows * dim],
            k,
            v,
            k0: k_layout.start_offset(),
            v0: v_layout.start_offset(),
            ks: [
                k_layout.stride()[0],
                k_layout.stride()[1],
                k_layout.stride()[2],
            ],
            vs: [
                v_layout.stride()[0],
                v_layout.stride()[1],
                v_layout.stride()[2],
            ],
            heads,
            len,
            head_dim,
            group: self.group,
            mask: self.mask.as_deref(),
        };
        let mut out = vec![0f32; rows * dim];
        out.par_chunks_mut(self.group * dim)
            .enumerate()
            .for_each_init(
                || Scratch {
                    scores: vec![0f32; self.group * len],
                    widened: vec![0f32; widened],
                },
                |scratch, (kr, out)| attend_group(&ops, kr, scratch, out),
            );
        Ok((CpuStorage::F32(out), Shape::from((rows, dim))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_abs_diff;

    /// The reference: scores = q·kᵀ + mask, softmax, · v with candle's ops.
    fn reference(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
        group: usize,
    ) -> Tensor {
        let (rows, dim) = q.dims2().unwrap();
        let (kv_rows, heads, _, hd) = k.dims4().unwrap();
        let q = q
            .reshape((kv_rows, group, heads, hd))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap(); // (kv_rows, heads, group, hd)
        let mut s = q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap();
        if let Some(m) = mask {
            s = s.broadcast_add(m).unwrap();
        }
        let p = candle_nn::ops::softmax_last_dim(&s).unwrap();
        p.matmul(&v.contiguous().unwrap())
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((rows, dim))
            .unwrap()
    }

    #[test]
    fn matches_matmul_softmax_attention_with_groups_masks_and_strided_caches() {
        let dev = Device::Cpu;
        let (kv_rows, heads, hd, len, group) = (3, 4, 20, 7, 5);
        let q = Tensor::randn(0f32, 1.0, (kv_rows * group, heads * hd), &dev).unwrap();
        // Keys/values as views of longer buffers (like the preallocated cache).
        let kbuf = Tensor::randn(0f32, 1.0, (kv_rows, heads, len + 4, hd), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (kv_rows, heads, len + 4, hd), &dev).unwrap();
        let k = kbuf.narrow(2, 0, len).unwrap();
        let v = vbuf.narrow(2, 0, len).unwrap();
        let mut mask = vec![0f32; kv_rows * len];
        mask[len - 1] = f32::MIN; // row 0 ignores its last key
        mask[2 * len - 3..2 * len].fill(f32::MIN); // row 1 its last three
        let mask_t = Tensor::from_vec(mask.clone(), (kv_rows, 1, 1, len), &dev).unwrap();
        let got = attend_single_query(&q, &k, &v, Some(mask.into()), group).unwrap();
        let want = reference(&q, &k, &v, Some(&mask_t), group);
        assert!(
            max_abs_diff(&got, &want) < 1e-5,
            "{}",
            max_abs_diff(&got, &want)
        );
        let got = attend_single_query(&q, &k, &v, None, group).unwrap();
        let want = reference(&q, &k, &v, None, group);
        assert!(max_abs_diff(&got, &want) < 1e-5);
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((3, 2, 5, 4), DType::F32, &dev).unwrap();
        assert!(attend_single_query(&q, &k, &k, None, 1).is_err());
        let q = Tensor::zeros((3, 8), DType::F32, &dev).unwrap();
        assert!(attend_single_query(&q, &k, &k, None, 1).is_ok());
        assert!(attend_single_query(&q, &k, &k, Some(vec![0.0; 2].into()), 1).is_err());
    }

    /// Keys and values stored in f16 or bf16 (as views of longer buffers, and contiguous)
    /// give what f32 keys/values of the same (rounded) values give.
    #[test]
    fn half_precision_keys_and_values_are_widened_exactly() {
        let dev = Device::Cpu;
        let (kv_rows, heads, hd, len, group) = (2, 3, 16, 9, 4);
        let q = Tensor::randn(0f32, 1.0, (kv_rows * group, heads * hd), &dev).unwrap();
        let kbuf = Tensor::randn(0f32, 1.0, (kv_rows, heads, len + 3, hd), &dev).unwrap();
        let vbuf = Tensor::randn(0f32, 1.0, (kv_rows, heads, len + 3, hd), &dev).unwrap();
        let mut mask = vec![0f32; kv_rows * len];
        mask[len + 2] = f32::MIN;
        for dtype in [DType::F16, DType::BF16] {
            let (kh, vh) = (kbuf.to_dtype(dtype).unwrap(), vbuf.to_dtype(dtype).unwrap());
            for (k, v) in [
                (kh.narrow(2, 0, len).unwrap(), vh.narrow(2, 0, len).unwrap()),
                (
                    kh.narrow(2, 1, len).unwrap().contiguous().unwrap(),
                    vh.narrow(2, 1, len).unwrap().contiguous().unwrap(),
                ),
            ] {
                let (k32, v32) = (
                    k.to_dtype(DType::F32).unwrap(),
                    v.to_dtype(DType::F32).unwrap(),
                );
                let m = Some(Arc::<[f32]>::from(mask.clone()));
                let got = attend_single_query(&q, &k, &v, m.clone(), group).unwrap();
                let want = attend_single_query(&q, &k32, &v32, m, group).unwrap();
                assert_eq!(max_abs_diff(&got, &want), 0.0, "{dtype:?}");
            }
        }
        let k = kbuf.to_dtype(DType::F16).unwrap();
        let v = vbuf.to_dtype(DType::BF16).unwrap();
        let err = attend_single_query(&q, &k, &v, None, group).unwrap_err();
        assert!(err.to_string().contains("differ in dtype"), "{err}");
    }
}
