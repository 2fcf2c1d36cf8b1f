//! The decoder's self-attention key/value cache for incremental decoding.
//!
//! Keys and values live in buffers preallocated for a number of positions (grown by doubling
//! when a step goes past them): a step writes its new position in place instead of
//! concatenating the whole history into a fresh tensor, so a step costs no copy of the history
//! and memory stays at one buffer per layer. Beam search's reordering is done in place on the CPU
//! (only the rows that change are copied); other devices gather into a new buffer.
//!
//! The buffers may hold f16 or bf16 instead of the model's f32 ([`SelfAttentionCache::stored_as`],
//! [`super::Bart::set_kv_cache_dtype`]): half the memory, and half the bytes attention reads per
//! step. New positions are rounded to the cache's dtype as they are written
//! ([`to_cache_dtype`]), and the fused step kernel ([`super::step_attention`]) widens them back
//! to f32 as it reads them.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor, WithDType};
use half::{bf16, f16};

use super::layers::KeyValues;
use super::packed::with_f32_slices;
use crate::vector_math;

/// Positions reserved when no capacity was asked for.
const DEFAULT_CAPACITY: usize = 16;

/// Self-attention keys and values of one decoder layer, `(rows, heads, capacity, head_dim)`
/// buffers of which the first `len` positions are filled.
///
/// The buffers are written in place, so a clone copies them (two caches never share one).
#[derive(Debug, Default)]
pub struct SelfAttentionCache {
    buffers: Option<KeyValues>,
    len: usize,
    capacity_hint: usize,
    /// The dtype of the buffers (`None`: that of the first keys/values written).
    dtype: Option<DType>,
}

impl Clone for SelfAttentionCache {
    fn clone(&self) -> Self {
        let copy = |t: &Tensor| t.copy().expect("copying a tensor on its own device");
        Self {
            buffers: self.buffers.as_ref().map(|b| KeyValues {
                keys: copy(&b.keys),
                values: copy(&b.values),
            }),
            len: self.len,
            capacity_hint: self.capacity_hint,
            dtype: self.dtype,
        }
    }
}

impl SelfAttentionCache {
    /// An empty cache that will reserve `capacity` positions when first written (more are added
    /// as needed).
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            capacity_hint: capacity,
            ..Self::default()
        }
    }

    /// An empty cache that stores keys and values in `dtype` (f32, f16 or bf16), whatever the
    /// dtype of those appended.
    pub fn stored_as(dtype: DType) -> Self {
        Self {
            dtype: Some(dtype),
            ..Self::default()
        }
    }

    /// Reserves `capacity` positions for the first write, if nothing was written yet.
    pub fn reserve(&mut self, capacity: usize) {
        if self.len == 0 {
            self.buffers = None;
            self.capacity_hint = capacity;
        }
    }

    /// The dtype keys and values are stored in (`None` before the first write of a cache
    /// without a chosen dtype).
    pub fn dtype(&self) -> Option<DType> {
        self.dtype
            .or_else(|| self.buffers.as_ref().map(KeyValues::dtype))
    }

    /// Bytes held by the buffers (their whole capacity).
    pub fn bytes(&self) -> usize {
        self.buffers.as_ref().map_or(0, |b| {
            2 * b.keys.elem_count() * b.keys.dtype().size_in_bytes()
        })
    }

    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold before they must grow (0 before the first write).
    pub fn capacity(&self) -> usize {
        self.buffers.as_ref().map_or(0, KeyValues::len)
    }

    /// Appends `new` (`(rows, heads, positions, head_dim)`) after the filled positions, converted
    /// to the cache's dtype.
    pub fn append(&mut self, new: &KeyValues) -> candle_core::Result<()> {
        let dtype = self.dtype.unwrap_or(new.keys.dtype());
        let new = &KeyValues {
            keys: to_cache_dtype(&new.keys, dtype)?,
            values: to_cache_dtype(&new.values, dtype)?,
        };
        let (rows, heads, added, head_dim) = new.keys.dims4()?;
        let needed = self.len + added;
        if needed > self.capacity() {
            let capacity = needed
                .max(self.capacity_hint)
                .max(2 * self.capacity())
                .max(DEFAULT_CAPACITY);
            let shape = (rows, heads, capacity, head_dim);
            let (dtype, device) = (new.keys.dtype(), new.keys.device());
            let grown = KeyValues {
                keys: Tensor::zeros(shape, dtype, device)?,
                values: Tensor::zeros(shape, dtype, device)?,
            };
            if let Some(old) = &self.buffers {
                let filled = self.view_of(old)?;
                grown.keys.slice_set(&filled.keys.contiguous()?, 2, 0)?;
                grown.values.slice_set(&filled.values.contiguous()?, 2, 0)?;
            }
            self.buffers = Some(grown);
        }
        let buffers = self.buffers.as_ref().expect("allocated above");
        if buffers.keys.dim(0)? != rows {
            candle_core::bail!(
                "key/value cache holds {} rows, a step brought {rows}",
                buffers.keys.dim(0)?
            );
        }
        buffers
            .keys
            .slice_set(&new.keys.contiguous()?, 2, self.len)?;
        buffers
            .values
            .slice_set(&new.values.contiguous()?, 2, self.len)?;
        self.len = needed;
        Ok(())
    }

    /// The filled positions, `(rows, heads, len, head_dim)` views into the buffers.
    pub fn view(&self) -> candle_core::Result<Option<KeyValues>> {
        self.buffers.as_ref().map(|b| self.view_of(b)).transpose()
    }

    fn view_of(&self, buffers: &KeyValues) -> candle_core::Result<KeyValues> {
        Ok(KeyValues {
            keys: buffers.keys.narrow(2, 0, self.len)?,
            values: buffers.values.narrow(2, 0, self.len)?,
        })
    }

    /// Keeps the given rows, in the given order, repeats allowed (inputs leaving the batch,
    /// beams taking copies of one row). Only the filled positions are copied, and the old
    /// buffers are released before the new ones (same capacity) are allocated, so the memory
    /// they held is reused rather than left as holes in the heap.
    pub fn select_rows(&mut self, rows: &[u32]) -> candle_core::Result<()> {
        let Some(buffers) = self.buffers.take() else {
            return Ok(());
        };
        let capacity = buffers.keys.dim(2)?;
        let idx = Tensor::new(rows, buffers.keys.device())?;
        let view = self.view_of(&buffers)?;
        let filled = KeyValues {
            keys: view.keys.contiguous()?.index_select(&idx, 0)?,
            values: view.values.contiguous()?.index_select(&idx, 0)?,
        };
        drop((view, buffers));
        let (n, heads, _, head_dim) = filled.keys.dims4()?;
        let shape = (n, heads, capacity, head_dim);
        let (dtype, device) = (filled.keys.dtype(), filled.keys.device());
        let fresh = KeyValues {
            keys: Tensor::zeros(shape, dtype, device)?,
            values: Tensor::zeros(shape, dtype, device)?,
        };
        fresh.keys.slice_set(&filled.keys, 2, 0)?;
        fresh.values.slice_set(&filled.values, 2, 0)?;
        self.buffers = Some(fresh);
        Ok(())
    }

    /// Makes row `i` hold what row `rows[i]` held (beam search reordering); `rows` must name
    /// every row once as a destination and may repeat sources.
    pub fn reorder(&mut self, rows: &[u32]) -> candle_core::Result<()> {
        let Some(buffers) = &self.buffers else {
            return Ok(());
        };
        let n = buffers.keys.dim(0)?;
        if rows.len() != n {
            candle_core::bail!("reorder got {} rows for a cache of {n}", rows.len());
        }
        if let Some(bad) = rows.iter().find(|&&r| r as usize >= n) {
            candle_core::bail!("reorder names row {bad} of a cache of {n}");
        }
        if rows.iter().enumerate().all(|(i, &r)| i == r as usize) {
            return Ok(());
        }
        if matches!(buffers.keys.device(), Device::Cpu) {
            let op = ReorderRows {
                rows: rows.to_vec(),
                filled: self.len,
            };
            buffers.keys.inplace_op1(&op)?;
            buffers.values.inplace_op1(&op)?;
        } else {
            let idx = Tensor::new(rows, buffers.keys.device())?;
            self.buffers = Some(buffers.select_rows(&idx)?);
        }
        Ok(())
    }
}

/// `t` in `dtype`, a key/value cache's: on the CPU, f32 to f16 or bf16 by the vectorised slice
/// conversions of [`crate::vector_math`] (rounded to nearest, ties to even, as candle's own
/// conversion, which converts one value at a time); anything else by candle's conversion.
pub fn to_cache_dtype(t: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    if !(t.device().is_cpu() && t.dtype() == DType::F32) {
        return t.to_dtype(dtype);
    }
    let n = t.elem_count();
    let t = t.contiguous()?;
    match dtype {
        DType::F16 => {
            let mut out = vec![f16::ZERO; n];
            with_f32_slices([&t], |[v]| vector_math::f32_to_f16_slice(v, &mut out))?;
            Tensor::from_vec(out, t.shape(), t.device())
        }
        DType::BF16 => {
            let mut out = vec![bf16::ZERO; n];
            with_f32_slices([&t], |[v]| vector_math::f32_to_bf16_slice(v, &mut out))?;
            Tensor::from_vec(out, t.shape(), t.device())
        }
        _ => t.to_dtype(dtype),
    }
}

/// In-place row gather over the first `filled` positions of a contiguous
/// `(rows, heads, capacity, head_dim)` CPU buffer: row `i` becomes row `rows[i]`.
struct ReorderRows {
    rows: Vec<u32>,
    filled: usize,
}

impl ReorderRows {
    fn apply<T: WithDType>(&self, data: &mut [T], layout: &Layout) -> candle_core::Result<()> {
        let (n, heads, capacity, head_dim) = layout.shape().dims4()?;
        if !layout.is_contiguous() {
            candle_core::bail!("the key/value cache must be contiguous to be reordered");
        }
        let data = &mut data[layout.start_offset()..][..n * heads * capacity * head_dim];
        let row_len = heads * capacity * head_dim;
        // The filled part of one head's positions.
        let seg = self.filled * head_dim;
        let moved: Vec<usize> = (0..n).filter(|&i| self.rows[i] as usize != i).collect();
        // Sources that are themselves overwritten are saved first; every other source keeps
        // its data throughout and is copied from where it is.
        let mut saved_rows: Vec<usize> = moved
            .iter()
            .map(|&i| self.rows[i] as usize)
            .filter(|&src| self.rows[src] as usize != src)
            .collect();
        saved_rows.sort_unstable();
        saved_rows.dedup();
        let mut saved = vec![T::zero(); saved_rows.len() * heads * seg];
        for (s, &src) in saved_rows.iter().enumerate() {
            for h in 0..heads {
                let from = src * row_len + h * capacity * head_dim;
                saved[(s * heads + h) * seg..][..seg].copy_from_slice(&data[from..from + seg]);
            }
        }
        for &i in &moved {
            let src = self.rows[i] as usize;
            let saved_at = saved_rows.binary_search(&src).ok();
            for h in 0..heads {
                let to = i * row_len + h * capacity * head_dim;
                match saved_at {
                    Some(s) => {
                        data[to..to + seg].copy_from_slice(&saved[(s * heads + h) * seg..][..seg])
                    }
                    None => {
                        let from = src * row_len + h * capacity * head_dim;
                        data.copy_within(from..from + seg, to);
                    }
                }
            }
        }
        Ok(())
    }
}

impl InplaceOp1 for ReorderRows {
    fn name(&self) -> &'static str {
        "kv-cache-reorder-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        match storage {
            CpuStorage::F32(d) => self.apply(d, layout),
            CpuStorage::F16(d) => self.apply(d, layout),
            CpuStorage::BF16(d) => self.apply(d, layout),
            CpuStorage::F64(d) => self.apply(d, layout),
            other => candle_core::bail!(
                "key/value cache reorder: unsupported dtype {:?}",
                other.dtype()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(rows: usize, heads: usize, t: usize, base: f32) -> KeyValues {
        let n = rows * heads * t * 2;
        let k: Vec<f32> = (0..n).map(|i| base + i as f32).collect();
        let v: Vec<f32> = (0..n).map(|i| -(base + i as f32)).collect();
        KeyValues {
            keys: Tensor::from_vec(k, (rows, heads, t, 2), &Device::Cpu).unwrap(),
            values: Tensor::from_vec(v, (rows, heads, t, 2), &Device::Cpu).unwrap(),
        }
    }

    fn cat(a: &KeyValues, b: &KeyValues) -> KeyValues {
        KeyValues {
            keys: Tensor::cat(&[&a.keys, &b.keys], 2).unwrap(),
            values: Tensor::cat(&[&a.values, &b.values], 2).unwrap(),
        }
    }

    fn same(a: &KeyValues, b: &KeyValues) {
        let f = |t: &Tensor| {
            t.contiguous()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(a.keys.dims(), b.keys.dims());
        assert_eq!(f(&a.keys), f(&b.keys));
        assert_eq!(f(&a.values), f(&b.values));
    }

    #[test]
    fn appending_and_growing_equals_concatenation() {
        let mut cache = SelfAttentionCache::with_capacity(3);
        let mut expected: Option<KeyValues> = None;
        for step in 0..7 {
            let added = if step == 2 { 2 } else { 1 };
            let new = kv(4, 3, added, 100.0 * step as f32);
            cache.append(&new).unwrap();
            expected = Some(match expected {
                None => new,
                Some(e) => cat(&e, &new),
            });
            same(&cache.view().unwrap().unwrap(), expected.as_ref().unwrap());
        }
        assert_eq!(cache.len(), 8);
        assert!(cache.capacity() >= 8);
    }

    #[test]
    fn reordering_in_place_equals_index_select() {
        let mut cache = SelfAttentionCache::with_capacity(8);
        let mut expected = kv(5, 2, 1, 0.0);
        cache.append(&expected).unwrap();
        for (step, rows) in [
            [0u32, 0, 0, 3, 4],
            [4, 3, 2, 1, 0],
            [1, 1, 4, 4, 2],
            [2, 0, 1, 3, 3],
            [0, 1, 2, 3, 4],
        ]
        .iter()
        .enumerate()
        {
            let new = kv(5, 2, 1, 1000.0 * (step + 1) as f32);
            cache.append(&new).unwrap();
            expected = cat(&expected, &new);
            cache.reorder(rows).unwrap();
            let idx = Tensor::new(rows.as_slice(), &Device::Cpu).unwrap();
            expected = expected.select_rows(&idx).unwrap();
            same(&cache.view().unwrap().unwrap(), &expected);
        }
    }

    #[test]
    fn selecting_rows_shrinks_the_cache_and_appending_continues() {
        let mut cache = SelfAttentionCache::with_capacity(4);
        let first = kv(4, 2, 1, 0.0);
        cache.append(&first).unwrap();
        cache.select_rows(&[1, 3]).unwrap();
        let idx = Tensor::new(&[1u32, 3], &Device::Cpu).unwrap();
        let second = kv(2, 2, 1, 500.0);
        cache.append(&second).unwrap();
        same(
            &cache.view().unwrap().unwrap(),
            &cat(&first.select_rows(&idx).unwrap(), &second),
        );
        // Rows repeated (beams copying one row): the capacity stays; then the history grows
        // past it.
        let capacity = cache.capacity();
        let before = cache.view().unwrap().unwrap();
        let before = KeyValues {
            keys: before.keys.contiguous().unwrap(),
            values: before.values.contiguous().unwrap(),
        };
        cache.select_rows(&[0, 0, 0, 1, 1, 1]).unwrap();
        assert_eq!(cache.capacity(), capacity);
        let idx = Tensor::new(&[0u32, 0, 0, 1, 1, 1], &Device::Cpu).unwrap();
        let third = kv(6, 2, capacity, 900.0);
        cache.append(&third).unwrap();
        same(
            &cache.view().unwrap().unwrap(),
            &cat(&before.select_rows(&idx).unwrap(), &third),
        );
    }

    #[test]
    fn a_clone_does_not_share_buffers() {
        let mut a = SelfAttentionCache::with_capacity(4);
        a.append(&kv(2, 1, 1, 0.0)).unwrap();
        let mut b = a.clone();
        b.append(&kv(2, 1, 1, 10.0)).unwrap();
        a.append(&kv(2, 1, 1, 20.0)).unwrap();
        b.reorder(&[1, 1]).unwrap();
        let first = kv(2, 1, 1, 0.0);
        same(
            &a.view().unwrap().unwrap(),
            &cat(&first, &kv(2, 1, 1, 20.0)),
        );
    }

    #[test]
    fn bad_reorders_are_errors() {
        let mut cache = SelfAttentionCache::default();
        cache.append(&kv(3, 1, 1, 0.0)).unwrap();
        assert!(cache.reorder(&[0, 1]).is_err());
        assert!(cache.reorder(&[0, 1, 3]).is_err());
    }

    fn f32_values(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .contiguous()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// A cache stored in f16 or bf16 holds what candle's conversion of the appended values
    /// gives, through growth and reordering, in half the bytes.
    #[test]
    fn half_precision_caches_hold_the_converted_values() {
        for dtype in [DType::F16, DType::BF16] {
            let mut cache = SelfAttentionCache::stored_as(dtype);
            let mut full = SelfAttentionCache::default();
            cache.reserve(2);
            for step in 0..5 {
                let new = kv(3, 2, 1, 0.37 * step as f32 + 0.011);
                cache.append(&new).unwrap();
                full.append(&new).unwrap();
                cache.reorder(&[2, 0, 0]).unwrap();
                full.reorder(&[2, 0, 0]).unwrap();
            }
            assert_eq!(cache.dtype(), Some(dtype));
            let got = cache.view().unwrap().unwrap();
            let want = full.view().unwrap().unwrap();
            assert_eq!(got.keys.dtype(), dtype);
            let want = want.to_dtype(dtype).unwrap();
            assert_eq!(f32_values(&got.keys), f32_values(&want.keys));
            assert_eq!(f32_values(&got.values), f32_values(&want.values));
            assert_eq!(2 * cache.bytes(), full.bytes());
        }
    }

    /// The vectorised conversion equals candle's, value for value (ties, subnormals, the
    /// largest values, infinities, NaN).
    #[test]
    fn cache_conversion_equals_candles() {
        let mut v: Vec<f32> = (0..4099)
            .map(|i| ((i * 7919) % 4001) as f32 * 0.731 - 1462.0)
            .collect();
        v.extend([
            0.0,
            -0.0,
            1.0 + f32::EPSILON * 64.0, // a bf16 tie: rounds to even
            1.0 + f32::EPSILON * 192.0,
            65504.0,
            65520.0, // f16 overflow
            1e-8,    // f16 subnormal / zero
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x7f80_0001), // a NaN that plain rounding would make infinite
            f32::NAN,
        ]);
        let t = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap();
        for dtype in [DType::F16, DType::BF16] {
            let ours = f32_values(&to_cache_dtype(&t, dtype).unwrap());
            let candle = f32_values(&t.to_dtype(dtype).unwrap());
            for (i, (a, b)) in ours.iter().zip(&candle).enumerate() {
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "{dtype:?} value {i} ({}): {a} vs {b}",
                    v[i]
                );
            }
        }
    }
}
