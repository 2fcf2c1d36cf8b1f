//! Attention for one new decoder position per row, fused into one CPU kernel.
//!
//! At a decoding step every row has a single query. Done with candle's batched matmul and
//! softmax, that is two tiny matrix products per (row, head) — thousands of library calls per
//! step for a beam-search batch, dominated by call overhead — plus the score and probability
//! tensors in between. This kernel computes, per row and head, the scores against the cached
//! keys, an additive mask, the softmax and the weighted sum of values in one pass, in parallel
//! over rows. It reads the keys/values through their strides, so the views of the preallocated
//! self-attention cache are used without copies. Numerically it is the same computation
//! (f32 accumulation; the order of additions differs from a matrix product's).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Whether [`attend_single_query`] can run here: f32 tensors on the CPU.
pub fn applies(q: &Tensor) -> bool {
    matches!(q.device(), Device::Cpu) && q.dtype() == DType::F32
}

/// Attention output `(rows, heads · head_dim)` for queries `q` `(rows, heads · head_dim)`
/// (already scaled) over `keys`/`values` `(kv_rows, heads, len, head_dim)` (any strides with a
/// contiguous last dimension), query row `r` reading key/value row `r / group`. `mask`, when
/// given, is additive, `kv_rows × len` values (row-major), added to the scores.
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

/// `Σ a[i]·b[i]` in eight independent lanes (vectorisable), then summed.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for (x, y) in ar.iter().zip(br) {
        sum += x * y;
    }
    sum
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
        let q = &f32_data(q_storage, "queries")?[q_layout.start_offset()..][..rows * dim];
        let k = f32_data(k_storage, "keys")?;
        let v = f32_data(v_storage, "values")?;
        let (ks, vs) = (k_layout.stride(), v_layout.stride());
        let (k0, v0) = (k_layout.start_offset(), v_layout.start_offset());
        let mut out = vec![0f32; rows * dim];
        out.par_chunks_mut(dim).enumerate().for_each_init(
            || vec![0f32; len],
            |scores, (r, out_row)| {
                let kr = r / self.group;
                let mask = self.mask.as_ref().map(|m| &m[kr * len..(kr + 1) * len]);
                for h in 0..heads {
                    let qh = &q[r * dim + h * head_dim..][..head_dim];
                    let kbase = k0 + kr * ks[0] + h * ks[1];
                    let mut max = f32::NEG_INFINITY;
                    for (j, s) in scores.iter_mut().enumerate() {
                        let kj = &k[kbase + j * ks[2]..][..head_dim];
                        *s = dot(qh, kj) + mask.map_or(0.0, |m| m[j]);
                        max = max.max(*s);
                    }
                    let mut total = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        total += *s;
                    }
                    let oh = &mut out_row[h * head_dim..][..head_dim];
                    let vbase = v0 + kr * vs[0] + h * vs[1];
                    for (j, &p) in scores.iter().enumerate() {
                        let p = p / total;
                        let vj = &v[vbase + j * vs[2]..][..head_dim];
                        for (o, &x) in oh.iter_mut().zip(vj) {
                            *o += p * x;
                        }
                    }
                }
            },
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
}
