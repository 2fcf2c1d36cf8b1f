//! Frozen weight matrices quantized to 8-bit integers, and their product with f32 activations on
//! the CPU, for inference.
//!
//! Scheme (fixed, so that every kernel below computes the same integer sums and hence the same
//! outputs on every CPU):
//!
//! - Weights: symmetric per output row. Row `j` gets `scale_j = max_k |W[j][k]| / 127` and codes
//!   `q[j][k] = round(W[j][k] / scale_j)` (half away from zero) in `-127..=127`; a zero row gets
//!   scale 0 and zero codes. `colsum_j = Σ_k q[j][k]` is kept beside them.
//! - Layout: panels of [`PANEL`] outputs as in [`super::packed`]; inside a panel the inputs come
//!   in groups of [`GROUP`]: group `g` of panel `p` is 64 bytes, byte `j·4 + t` holding
//!   `q[p·16 + j][4g + t]` — one 4-byte lane per output, the operand shape of `vpmaddubsw` and
//!   `vpdpbusd`. Inputs are padded with zero codes to a multiple of 4, outputs past the end are
//!   zero.
//! - Activations, per row of `x` and once per product: asymmetric 8-bit with 255 levels. With
//!   `lo`, `hi` the row's minimum and maximum, `s = (hi − lo) / 254` and
//!   `xq_k = min(round((x_k − lo) / s), 254)` as `u8` (`s = 0` and all codes 0 when `hi == lo`:
//!   the row is then exactly `lo`).
//! - Product: `acc[r][j] = Σ_k xq[r][k]·q[j][k]` in i32 (exact: `|acc| ≤ 254·127·inputs`, so at
//!   most [`MAX_INPUTS`] inputs), then `y[r][j] = scale_j·(s_r·acc[r][j] + lo_r·colsum_j) + b_j`
//!   in f32, always in that order.
//!
//! Why 255 activation levels rather than the 128 of PyTorch's fbgemm with `reduce_range` (which
//! this module first used): measured on a small model trained from scratch (test
//! `int8_quality`), the activations' rounding, not the weights', was most of the int8 error —
//! the mean KL divergence of the next-token distributions from f32 fell from 3.6e-4 with 7-bit
//! activations to 1.6e-4 with 8-bit (and to 1.2e-4 with exact activations and int8 weights),
//! and the rows whose keywords changed from 7.6% to 5.2% on data/valid.tsv. fbgemm keeps 7 bits
//! because AVX2's `vpmaddubsw` adds two `u8·i8` products in saturating i16 (2·254·127 > 32767);
//! the AVX2 kernel here instead multiplies `xq − 127` (in `-127..=127`) by the weights with the
//! sign trick (`vpmaddubsw(|q|, sign(xq − 127, q))`: 2·127·127 < 32767, exact) and adds
//! `127·colsum_j` afterwards, which gives the same i32 sums. The VNNI kernels take the `u8`
//! codes as they are (`vpdpbusd` adds into i32 without saturating).
//!
//! Non-finite activations: a row holding NaN or ±∞ gives NaN in every output of that row (its
//! other rows are unaffected); so does a finite row whose range `hi − lo` overflows f32
//! (values beyond ±1.7e38). Weights must be finite ([`QuantizedWeight::quantize`] refuses
//! others).
//!
//! Kernels, chosen once at run time (see [`Int8Kernel`]; `KB_INT8_KERNEL` forces one), each add
//! the i32 sums of up to R rows × one panel over a block of input groups: portable Rust; AVX2
//! (`vpsignb` + `vpmaddubsw` + `vpmaddwd` against ones, on codes offset by −127, see above);
//! AVX-VNNI (`vpdpbusd` on ymm); AVX512-VNNI (`vpdpbusd` on zmm, one register per row). Integer
//! sums are exact in every one, so all give bit-identical outputs. The tests compare every kernel
//! the CPU reports against i64 sums, bit for bit: the portable, AVX2 and AVX512-VNNI kernels have
//! passed them natively (AVX2 on AMD EPYC Zen 3; portable, AVX2 and AVX512-VNNI on an AMD EPYC
//! with AVX-512). The AVX-VNNI kernel (Intel Alder Lake and later; Sapphire Rapids has it beside
//! AVX512-VNNI) has not met a CPU with it yet — QEMU's TCG (7.2 and 10.0) implements neither
//! VNNI — and is checked the first time the tests run on one.
//!
//! Why: at decoding shapes (5 rows for one query's beams, 80 for 16 queries) the f32 product of
//! [`super::packed`] is bound by reading its weights from memory; int8 codes are a quarter of the
//! bytes, and the AVX2 integer path does twice the multiply-adds per instruction of f32 FMA.
//! Measured with the example `int8_product` on 2 Zen 3 cores shared with other work (AVX2 path,
//! cache-cold: a distinct weight per product, medians): 2.7–3.7× faster than the f32 packed
//! product at 1 and 5 rows (768 → 3072: 0.33 vs 1.15 ms at 1 row, 0.44 vs 1.28 ms at 5), and
//! 1.5–2.4× at 80 rows (4.6 vs 7.6 ms). candle's own 8-bit product (`QMatMul` over
//! `GgmlDType::Q8_0`: blocks of 32 inputs with f16 scales, a dot product per row and output) was
//! 2.5–24× slower than this one at the same shapes, and slower than f32 from 5 rows on.
//!
//! Accuracy (test `accuracy_against_f32`, N(0,1) weights and activations): against the f32
//! product the error's RMS is 1.6% of the outputs' RMS at 768 → 3072 and 1.8% at 3072 → 768, its
//! largest value 6.5% and 7.0% of it (both the weights' and the activations' rounding steps grow
//! with the largest value of a row, so heavy-tailed rows fare worse).

use std::sync::{Arc, OnceLock};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::packed::{with_f32_slices, Epilogue, PANEL};
use super::panel_product::{
    check_operands, product_by_panels, selected_kernel, tile_span, KernelFamily,
};

/// Inputs per group: the 4 consecutive inputs whose products one `vpdpbusd` lane adds.
pub const GROUP: usize = 4;

/// The most activation code (255 levels: `0..=254`).
const MAX_CODE: u8 = 254;

/// The most inputs a weight may have: beyond it the i32 sums could overflow (254·127·inputs
/// must stay below 2³¹).
pub const MAX_INPUTS: usize = i32::MAX as usize / (MAX_CODE as usize * 127);

/// Environment variable that forces a kernel (`portable`, `avx2`, `avxvnni` or `avx512vnni`).
pub const KERNEL_ENV: &str = "KB_INT8_KERNEL";

/// Input groups per block of a panel (16 KiB of it: stays in L1 while every row tile reads it).
const DEPTH_GROUPS: usize = 256;

/// The most rows any kernel handles in one tile.
const MAX_TILE_ROWS: usize = 16;

/// Values per activation-range accumulation (kept in lanes so that the loop vectorises).
const LANES: usize = 8;

/// One group of a panel: [`GROUP`] inputs × [`PANEL`] outputs, byte `j·GROUP + t` for output `j`
/// and input `t`. Cache-line aligned, so a zmm load of it is aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Group([i8; GROUP * PANEL]);

/// The quantized matrix: all panels, with their per-output scales and code sums.
struct Codes {
    /// `panels × groups_per_panel` groups.
    groups: Vec<Group>,
    /// `scale_j` for `panels × PANEL` outputs (0 past the end).
    scales: Vec<f32>,
    /// `colsum_j` for `panels × PANEL` outputs (0 past the end).
    colsums: Vec<i32>,
}

/// A frozen `(outputs, inputs)` weight matrix quantized to int8 in panels (see the module docs).
/// Cloning shares the data; [`QuantizedWeight::narrow_outputs`] views a range of panels without
/// a copy.
#[derive(Clone)]
pub struct QuantizedWeight {
    data: Arc<Codes>,
    /// First panel of this view in `data`.
    first_panel: usize,
    outputs: usize,
    inputs: usize,
}

impl std::fmt::Debug for QuantizedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedWeight")
            .field("outputs", &self.outputs)
            .field("inputs", &self.inputs)
            .finish()
    }
}

/// Runs `f` on the f32 values of a CPU tensor (made contiguous first) without copying them.
fn with_contiguous_f32<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    with_f32_slices([&t.contiguous()?], |[values]| f(values))?
}

/// The code of `v` at `scale` (> 0): `round(v / scale)`, half away from zero, in `-127..=127`.
fn weight_code(v: f32, scale: f32) -> i8 {
    (v / scale).round().clamp(-127.0, 127.0) as i8
}

impl QuantizedWeight {
    /// Quantizes `weight` `(outputs, inputs)`: f32, f16 or bf16 (converted to f32 first) on the
    /// CPU, any strides, finite values, at most [`MAX_INPUTS`] inputs.
    pub fn quantize(weight: &Tensor) -> candle_core::Result<Self> {
        if !matches!(weight.device(), Device::Cpu)
            || !matches!(weight.dtype(), DType::F32 | DType::F16 | DType::BF16)
        {
            candle_core::bail!(
                "quantized weight: expected an f32, f16 or bf16 CPU tensor, got {:?} on {:?}",
                weight.dtype(),
                weight.device()
            );
        }
        let (outputs, inputs) = weight.dims2()?;
        if inputs > MAX_INPUTS {
            candle_core::bail!(
                "quantized weight: {inputs} inputs, more than the {MAX_INPUTS} whose int8 sums \
                 fit i32"
            );
        }
        // f32 is read in place when contiguous (the loaded case); other dtypes are converted.
        let weight = weight.to_dtype(DType::F32)?;
        let codes =
            with_contiguous_f32(&weight, |dense| Self::panels_from(dense, outputs, inputs))?;
        Ok(Self {
            data: Arc::new(codes),
            first_panel: 0,
            outputs,
            inputs,
        })
    }

    /// The quantized panels of the row-major `(outputs, inputs)` matrix `dense`.
    fn panels_from(dense: &[f32], outputs: usize, inputs: usize) -> candle_core::Result<Codes> {
        let per_panel = inputs.div_ceil(GROUP);
        let panels = outputs.div_ceil(PANEL);
        let mut codes = Codes {
            groups: vec![Group([0; GROUP * PANEL]); panels * per_panel],
            scales: vec![0f32; panels * PANEL],
            colsums: vec![0i32; panels * PANEL],
        };
        // Zero inputs: no groups, and every scale and sum stays 0.
        if per_panel == 0 {
            return Ok(codes);
        }
        let bad_row = codes
            .groups
            .par_chunks_mut(per_panel)
            .zip(codes.scales.par_chunks_mut(PANEL))
            .zip(codes.colsums.par_chunks_mut(PANEL))
            .enumerate()
            .try_for_each(|(p, ((panel, scales), colsums))| {
                for j in 0..PANEL.min(outputs - p * PANEL) {
                    let row = &dense[(p * PANEL + j) * inputs..][..inputs];
                    if row.iter().any(|v| !v.is_finite()) {
                        return Err(p * PANEL + j);
                    }
                    let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                    if max == 0.0 {
                        continue; // scale 0, zero codes
                    }
                    let scale = max / 127.0;
                    let mut sum = 0i32;
                    for (k, &v) in row.iter().enumerate() {
                        let q = weight_code(v, scale);
                        panel[k / GROUP].0[j * GROUP + k % GROUP] = q;
                        sum += i32::from(q);
                    }
                    scales[j] = scale;
                    colsums[j] = sum;
                }
                Ok(())
            });
        if let Err(row) = bad_row {
            candle_core::bail!("quantized weight: row {row} holds a non-finite value");
        }
        Ok(codes)
    }

    /// Output features (rows of `W`).
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Input features (columns of `W`).
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Bytes held by the quantized data (codes, scales and sums of every panel). Views made by
    /// [`QuantizedWeight::narrow_outputs`] share one allocation and each report all of it.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(&self.data.groups[..])
            + std::mem::size_of_val(&self.data.scales[..])
            + std::mem::size_of_val(&self.data.colsums[..])
    }

    /// Groups per panel.
    fn groups_per_panel(&self) -> usize {
        self.inputs.div_ceil(GROUP)
    }

    /// Panels of this view.
    fn panel_count(&self) -> usize {
        self.outputs.div_ceil(PANEL)
    }

    /// The groups, scales and sums of this view's panels.
    fn view(&self) -> (&[Group], &[f32], &[i32]) {
        let per_panel = self.groups_per_panel();
        let panels = self.panel_count();
        let first = self.first_panel;
        (
            &self.data.groups[first * per_panel..][..panels * per_panel],
            &self.data.scales[first * PANEL..][..panels * PANEL],
            &self.data.colsums[first * PANEL..][..panels * PANEL],
        )
    }

    /// Output features `[from, from + len)` as a weight of their own, sharing the data. `from`
    /// must be a multiple of [`PANEL`], and so must `len` unless the range ends at the last output.
    pub fn narrow_outputs(&self, from: usize, len: usize) -> candle_core::Result<Self> {
        let end = from + len;
        if end > self.outputs
            || !from.is_multiple_of(PANEL)
            || (!len.is_multiple_of(PANEL) && end != self.outputs)
        {
            candle_core::bail!(
                "quantized weight: outputs {from}..{end} of {} are not whole panels of {PANEL}",
                self.outputs
            );
        }
        Ok(Self {
            data: self.data.clone(),
            first_panel: self.first_panel + from / PANEL,
            outputs: len,
            inputs: self.inputs,
        })
    }

    /// Rows `ids` of the dequantized matrix (`q[j][k]·scale_j`: a lookup in it as an embedding
    /// table), `(ids.len(), inputs)` f32.
    pub fn select_rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let (groups, scales, _) = self.view();
        let per_panel = self.groups_per_panel();
        let mut out: Vec<f32> = Vec::with_capacity(ids.len() * self.inputs);
        for &id in &ids {
            let id = id as usize;
            if id >= self.outputs {
                candle_core::bail!("index {id} out of range for {} rows", self.outputs);
            }
            let (p, j) = (id / PANEL, id % PANEL);
            let scale = scales[id];
            let panel = &groups[p * per_panel..][..per_panel];
            out.extend(
                panel
                    .iter()
                    .flat_map(|g| &g.0[j * GROUP..][..GROUP])
                    .take(self.inputs)
                    .map(|&q| f32::from(q) * scale),
            );
        }
        Tensor::from_vec(out, (ids.len(), self.inputs), &Device::Cpu)
    }

    /// `x Wᵀ (+ bias)` for `x` `(rows, inputs)` (f32 on the CPU): `(rows, outputs)`, with `x`
    /// quantized per row as the module docs say.
    pub fn linear(&self, x: &Tensor, bias: Option<&[f32]>) -> candle_core::Result<Tensor> {
        self.linear_then(x, bias, None)
    }

    /// [`QuantizedWeight::linear`] followed by `epilogue` on the outputs (e.g. the activation of
    /// a feed-forward layer), applied to each block of results while it is still in cache, on
    /// the threads that computed it. `epilogue` must act element by element.
    pub fn linear_then(
        &self,
        x: &Tensor,
        bias: Option<&[f32]>,
        epilogue: Option<Epilogue>,
    ) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        let y = self.host_product(x, bias, epilogue)?;
        Tensor::from_vec(y, (rows, self.outputs), &Device::Cpu)
    }

    /// [`QuantizedWeight::linear`] returning the `rows × outputs` result as host values
    /// (row-major), for a consumer that reads it on the host (the decoder's vocabulary logits).
    pub fn linear_to_host(
        &self,
        x: &Tensor,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<Vec<f32>> {
        self.host_product(x, bias, None)
    }

    fn host_product(
        &self,
        x: &Tensor,
        bias: Option<&[f32]>,
        epilogue: Option<Epilogue>,
    ) -> candle_core::Result<Vec<f32>> {
        let rows = check_operands("quantized linear", x, self.outputs, self.inputs, bias)?;
        let kernel = Int8Kernel::selected()?;
        with_contiguous_f32(x, |x| Ok(self.product(x, rows, bias, kernel, epilogue)))
    }

    /// `x Wᵀ (+ bias)`, then `epilogue`, with the given kernel (which the CPU must run); `x`
    /// holds `rows × inputs` values.
    fn product(
        &self,
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
        kernel: Int8Kernel,
        epilogue: Option<Epilogue>,
    ) -> Vec<f32> {
        if rows == 0 || self.outputs == 0 {
            return vec![0f32; rows * self.outputs];
        }
        let tile = kernel.tile();
        let tiles = rows.div_ceil(tile.rows);
        let acts = Activations::quantize(x, rows, self.inputs, tile.code_offset);
        let stride = acts.stride;
        let (groups, scales, colsums) = self.view();
        let per_panel = self.groups_per_panel();
        let new_state = || {
            (
                vec![[[0i32; PANEL]; MAX_TILE_ROWS]; tiles],
                [0f32; MAX_TILE_ROWS * PANEL],
            )
        };
        product_by_panels(rows, self.outputs, epilogue, new_state, |state, out| {
            let (acc, result) = state;
            let p = out.panel();
            let panel = &groups[p * per_panel..][..per_panel];
            acc.fill([[0; PANEL]; MAX_TILE_ROWS]);
            // The panel in blocks of DEPTH_GROUPS groups: one block stays in L1 across tiles.
            for g0 in (0..per_panel).step_by(DEPTH_GROUPS) {
                let block = &panel[g0..][..DEPTH_GROUPS.min(per_panel - g0)];
                for (t, a) in acc.iter_mut().enumerate() {
                    let (r0, tile_rows) = tile_span(rows, tiles, t);
                    let xs = &acts.codes[r0 * stride + g0 * GROUP..]
                        [..(tile_rows - 1) * stride + block.len() * GROUP];
                    (tile.add)(xs, stride, tile_rows, block, a);
                }
            }
            let scale = &scales[p * PANEL..][..PANEL];
            let colsum: &[i32; PANEL] = colsums[p * PANEL..][..PANEL].try_into().expect("a panel");
            if tile.code_offset != 0 {
                // The kernel summed (xq − offset)·q: add offset·colsum back (exact).
                let offset = i32::from(tile.code_offset);
                for a in acc.iter_mut() {
                    for a in a.iter_mut() {
                        for (a, c) in a.iter_mut().zip(colsum) {
                            *a += offset * c;
                        }
                    }
                }
            }
            let mut start = [0f32; PANEL];
            if let Some(b) = bias {
                start[..out.width()].copy_from_slice(&b[p * PANEL..][..out.width()]);
            }
            for (t, a) in acc.iter().enumerate() {
                let (r0, tile_rows) = tile_span(rows, tiles, t);
                let result = &mut result[..tile_rows * PANEL];
                for (r, y) in result.chunks_exact_mut(PANEL).enumerate() {
                    let (s, lo) = acts.params[r0 + r];
                    dequantize(&a[r], scale, colsum, s, lo, &start, y);
                }
                out.write(result);
            }
        })
    }
}

/// `y_j = scale_j·(s·acc_j + lo·colsum_j) + start_j` for one row of a panel, in exactly this
/// order of f32 operations (the scheme of the module docs).
#[inline]
fn dequantize(
    acc: &[i32; PANEL],
    scale: &[f32],
    colsum: &[i32],
    s: f32,
    lo: f32,
    start: &[f32; PANEL],
    y: &mut [f32],
) {
    for j in 0..PANEL {
        y[j] = scale[j] * (s * acc[j] as f32 + lo * colsum[j] as f32) + start[j];
    }
}

/// The rows of `x` quantized to 8-bit codes (see the module docs).
struct Activations {
    /// `rows × stride` codes minus the kernel's code offset (wrapping), each row padded with
    /// zeros (whatever the padding holds meets zero weight codes).
    codes: Vec<u8>,
    /// Codes per row: the inputs rounded up to a multiple of [`GROUP`].
    stride: usize,
    /// `(s, lo)` of each row.
    params: Vec<(f32, f32)>,
}

impl Activations {
    /// Quantizes the `rows × inputs` values of `x`, rows in parallel when there are many,
    /// storing each code minus `offset` (wrapping: a kernel that reads `i8` codes gets
    /// `xq − 127` with offset 127).
    fn quantize(x: &[f32], rows: usize, inputs: usize, offset: u8) -> Self {
        let stride = inputs.div_ceil(GROUP) * GROUP;
        let mut codes = vec![0u8; rows * stride];
        let mut params = vec![(0f32, 0f32); rows];
        if inputs > 0 {
            if rows * inputs < 1 << 15 {
                let work = codes
                    .chunks_mut(stride)
                    .zip(x.chunks(inputs))
                    .zip(params.iter_mut());
                work.for_each(|((c, x), p)| *p = quantize_row(x, c, offset));
            } else {
                codes
                    .par_chunks_mut(stride)
                    .zip(x.par_chunks(inputs))
                    .zip(params.par_iter_mut())
                    .for_each(|((c, x), p)| *p = quantize_row(x, c, offset));
            }
        }
        Self {
            codes,
            stride,
            params,
        }
    }
}

/// The smallest and largest value of `x` (±∞ for an empty row), and 0 if every value is finite
/// (NaN otherwise).
#[inline(always)]
fn row_range(x: &[f32]) -> (f32, f32, f32) {
    let mut lo = [f32::INFINITY; LANES];
    let mut hi = [f32::NEG_INFINITY; LANES];
    let mut finite = [0f32; LANES]; // v·0 is ±0 for finite v, NaN for ±∞ and NaN
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let v = c[l];
            lo[l] = if v < lo[l] { v } else { lo[l] };
            hi[l] = if v > hi[l] { v } else { hi[l] };
            finite[l] += v * 0.0;
        }
    }
    let (mut min, mut max, mut check) = (f32::INFINITY, f32::NEG_INFINITY, 0f32);
    for &v in rest {
        min = if v < min { v } else { min };
        max = if v > max { v } else { max };
        check += v * 0.0;
    }
    for l in 0..LANES {
        min = if lo[l] < min { lo[l] } else { min };
        max = if hi[l] > max { hi[l] } else { max };
        check += finite[l];
    }
    (min, max, check)
}

/// Quantizes one row of activations into `codes` (at least `x.len()` long; the rest is zeroed),
/// each code minus `offset` (wrapping), returning `(s, lo)`: `(0, 0)` for an empty row, NaN for
/// a row with a non-finite value or a range beyond f32.
#[inline(always)]
fn quantize_row_body(x: &[f32], codes: &mut [u8], offset: u8) -> (f32, f32) {
    let (codes, padding) = codes.split_at_mut(x.len());
    padding.fill(0);
    if x.is_empty() {
        return (0.0, 0.0);
    }
    let (lo, hi, check) = row_range(x);
    let s = (hi - lo) / f32::from(MAX_CODE);
    if check != 0.0 || !s.is_finite() {
        codes.fill(0u8.wrapping_sub(offset));
        return (f32::NAN, f32::NAN);
    }
    if s == 0.0 {
        // hi == lo (or a range too small to divide by 254): the row is `lo`.
        codes.fill(0u8.wrapping_sub(offset));
        return (0.0, lo);
    }
    for (c, &v) in codes.iter_mut().zip(x) {
        // v − lo ≥ 0, so the conversion's saturation at 0 never acts; 254 is the clamp.
        let code = ((v - lo) / s).round().min(f32::from(MAX_CODE)) as u8;
        *c = code.wrapping_sub(offset);
    }
    (s, lo)
}

crate::vector_math::dispatched! {
    /// Quantizes one row of activations (see [`quantize_row_body`]).
    fn quantize_row(x: &[f32], codes: &mut [u8], offset: u8) -> (f32, f32) = quantize_row_body;
}

/// An int8 product kernel. Each computes the same exact integer sums; they differ in the
/// instructions they need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Kernel {
    /// Plain Rust loops that the compiler vectorises for the target: any CPU.
    Portable,
    /// AVX2: `vpsignb` and `vpmaddubsw` (`|q|·sign(xq − 127, q)` pairs to i16, never
    /// saturating) then `vpmaddwd` with ones (to i32) and `vpaddd`, `127·colsum` added after;
    /// 6 rows × 16 outputs in 12 ymm accumulators.
    Avx2,
    /// AVX-VNNI: `vpdpbusd` on ymm (four u8·i8 products added into each i32 lane); 6 rows.
    AvxVnni,
    /// AVX512-VNNI: `vpdpbusd` on zmm, one register per row and panel; 16 rows.
    Avx512Vnni,
}

impl KernelFamily for Int8Kernel {
    const ALL: &'static [Self] = &[
        Int8Kernel::Portable,
        Int8Kernel::Avx2,
        Int8Kernel::AvxVnni,
        Int8Kernel::Avx512Vnni,
    ];
    const ENV: &'static str = KERNEL_ENV;
    const WHAT: &'static str = "int8";

    fn name(self) -> &'static str {
        match self {
            Int8Kernel::Portable => "portable",
            Int8Kernel::Avx2 => "avx2",
            Int8Kernel::AvxVnni => "avxvnni",
            Int8Kernel::Avx512Vnni => "avx512vnni",
        }
    }

    fn needs(self) -> &'static str {
        match self {
            Int8Kernel::Portable => "nothing",
            Int8Kernel::Avx2 => "AVX2",
            Int8Kernel::AvxVnni => "AVX2 and AVX-VNNI",
            Int8Kernel::Avx512Vnni => "AVX512F, AVX512BW and AVX512-VNNI",
        }
    }

    fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Int8Kernel::Portable => true,
                Int8Kernel::Avx2 => is_x86_feature_detected!("avx2"),
                Int8Kernel::AvxVnni => {
                    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni")
                }
                Int8Kernel::Avx512Vnni => {
                    is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Int8Kernel::Portable
        }
    }
}

impl Int8Kernel {
    /// The kernel the products use (see [`selected_kernel`]).
    pub fn selected() -> candle_core::Result<Int8Kernel> {
        static SELECTED: OnceLock<Result<Int8Kernel, String>> = OnceLock::new();
        selected_kernel(&SELECTED)
    }

    /// The tile function and its rows per tile. Panics if the CPU cannot run the kernel (the
    /// x86 tile functions rely on that check).
    fn tile(self) -> Tile {
        assert!(
            self.is_supported(),
            "the {} int8 kernel on a CPU without it",
            self.name()
        );
        match self {
            Int8Kernel::Portable => Tile {
                rows: PORTABLE_ROWS,
                add: portable_tile,
                code_offset: 0,
            },
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Avx2 => Tile {
                rows: x86::AVX2_ROWS,
                add: x86::avx2_tile,
                code_offset: x86::AVX2_CODE_OFFSET,
            },
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::AvxVnni => Tile {
                rows: x86::AVXVNNI_ROWS,
                add: x86::avxvnni_tile,
                code_offset: 0,
            },
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Avx512Vnni => Tile {
                rows: x86::AVX512VNNI_ROWS,
                add: x86::avx512vnni_tile,
                code_offset: 0,
            },
            #[cfg(not(target_arch = "x86_64"))]
            _ => Tile {
                rows: PORTABLE_ROWS,
                add: portable_tile,
                code_offset: 0,
            },
        }
    }
}

/// i32 sums of up to [`MAX_TILE_ROWS`] rows × one panel.
type Acc = [[i32; PANEL]; MAX_TILE_ROWS];

/// A tile kernel: for `rows` rows of activation codes (row `r` starts at `r·stride` in `xq`,
/// `block.len()·GROUP` codes, stored minus the tile's [`Tile::code_offset`]) and a block of a
/// panel, adds `Σₖ xq[r][k]·q[j][k]` to `acc[r][j]` — with the codes as stored: `u8` for an
/// offset of 0, `i8` (`xq − 127`) for the AVX2 kernel's 127. Only called for kernels the CPU
/// supports.
type TileFn = fn(&[u8], usize, usize, &[Group], &mut Acc);

/// A kernel's tile function, the most rows it takes, and the offset its codes are stored at.
#[derive(Clone, Copy)]
struct Tile {
    rows: usize,
    add: TileFn,
    /// Subtracted from every activation code before the tile reads it; the product adds
    /// `code_offset·colsum_j` to the sums afterwards.
    code_offset: u8,
}

/// Panics unless a kernel's arguments are in bounds: 1 to `max_rows` rows of
/// `block.len()·GROUP` codes `stride` apart in `xq`.
fn check_tile(xq: &[u8], stride: usize, rows: usize, block: &[Group], max_rows: usize) {
    assert!((1..=max_rows).contains(&rows), "{rows} rows in a tile");
    assert!(xq.len() >= (rows - 1) * stride + block.len() * GROUP);
}

/// Rows per tile of the portable kernel.
const PORTABLE_ROWS: usize = 4;

/// Portable kernel: plain loops over fixed-size arrays, vectorised by the compiler.
fn portable_tile(xq: &[u8], stride: usize, rows: usize, block: &[Group], acc: &mut Acc) {
    check_tile(xq, stride, rows, block, PORTABLE_ROWS);
    let mut sums = [[0i32; PANEL]; PORTABLE_ROWS];
    for (g, w) in block.iter().enumerate() {
        for (r, s) in sums[..rows].iter_mut().enumerate() {
            let a: &[u8; GROUP] = xq[r * stride + g * GROUP..][..GROUP]
                .try_into()
                .expect("a group of codes");
            for (s, w) in s.iter_mut().zip(w.0.chunks_exact(GROUP)) {
                for t in 0..GROUP {
                    *s += i32::from(a[t]) * i32::from(w[t]);
                }
            }
        }
    }
    for (a, s) in acc.iter_mut().zip(&sums[..rows]) {
        for (a, s) in a.iter_mut().zip(s) {
            *a += s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{check_tile, Acc, Group, GROUP};

    /// Rows per tile of the AVX2 kernel (2 ymm accumulators per row: 12 of 16 registers).
    pub(super) const AVX2_ROWS: usize = 6;
    /// The AVX2 kernel reads codes `xq − 127` as `i8` (`-127..=127`: `vpsignb` keeps them so).
    pub(super) const AVX2_CODE_OFFSET: u8 = 127;
    /// Rows per tile of the AVX-VNNI kernel (2 ymm accumulators per row).
    pub(super) const AVXVNNI_ROWS: usize = 6;
    /// Rows per tile of the AVX512-VNNI kernel (one zmm accumulator per row: 16 of 32).
    pub(super) const AVX512VNNI_ROWS: usize = 16;

    /// The 4 codes of row `r`, group `g`, as one i32 (to broadcast).
    ///
    /// # Safety
    /// `xp + r·stride + g·GROUP ..+ 4` must be readable.
    #[inline(always)]
    unsafe fn codes4(xp: *const u8, stride: usize, r: usize, g: usize) -> i32 {
        xp.add(r * stride + g * GROUP)
            .cast::<i32>()
            .read_unaligned()
    }

    /// AVX2 kernel (see [`super::TileFn`]); handed out only when the CPU has AVX2.
    pub(super) fn avx2_tile(xq: &[u8], stride: usize, rows: usize, block: &[Group], acc: &mut Acc) {
        check_tile(xq, stride, rows, block, AVX2_ROWS);
        // SAFETY: the CPU has AVX2 (`Int8Kernel::tile`, the only way to this function, asserts
        // it); the bounds were checked above and each instantiation reads rows `0..R` of `xq`.
        unsafe {
            match rows {
                6 => avx2_rows::<6>(xq, stride, block, acc),
                5 => avx2_rows::<5>(xq, stride, block, acc),
                4 => avx2_rows::<4>(xq, stride, block, acc),
                3 => avx2_rows::<3>(xq, stride, block, acc),
                2 => avx2_rows::<2>(xq, stride, block, acc),
                _ => avx2_rows::<1>(xq, stride, block, acc),
            }
        }
    }

    /// `R` rows × 16 outputs in 2·R registers, on `i8` codes (`xq − 127`); per group one panel
    /// load (two ymm) and its absolute values, and per row one 4-byte broadcast, two `vpsignb`
    /// (the codes with the weights' signs: `|q|·sign(a, q) = a·q`), two `vpmaddubsw` (pairs of
    /// `u8·i8` products, at most 2·127·127: no saturation), two `vpmaddwd` and two adds.
    #[target_feature(enable = "avx2")]
    unsafe fn avx2_rows<const R: usize>(xq: &[u8], stride: usize, block: &[Group], acc: &mut Acc) {
        let (xp, wp) = (xq.as_ptr(), block.as_ptr());
        let ones = _mm256_set1_epi16(1);
        let mut sums = [[_mm256_setzero_si256(); 2]; R];
        for g in 0..block.len() {
            let w = wp.add(g).cast::<__m256i>();
            let w0 = _mm256_load_si256(w);
            let w1 = _mm256_load_si256(w.add(1));
            let (u0, u1) = (_mm256_abs_epi8(w0), _mm256_abs_epi8(w1));
            for (r, s) in sums.iter_mut().enumerate() {
                let a = _mm256_set1_epi32(codes4(xp, stride, r, g));
                let a0 = _mm256_sign_epi8(a, w0);
                let a1 = _mm256_sign_epi8(a, w1);
                let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(u0, a0), ones);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(u1, a1), ones);
                s[0] = _mm256_add_epi32(s[0], p0);
                s[1] = _mm256_add_epi32(s[1], p1);
            }
        }
        store_ymm(&sums, acc);
    }

    /// Adds two ymm of i32 sums per row to `acc`.
    #[inline(always)]
    unsafe fn store_ymm<const R: usize>(sums: &[[__m256i; 2]; R], acc: &mut Acc) {
        for (s, a) in sums.iter().zip(acc.iter_mut()) {
            let ap = a.as_mut_ptr().cast::<__m256i>();
            _mm256_storeu_si256(ap, _mm256_add_epi32(_mm256_loadu_si256(ap), s[0]));
            let ap = ap.add(1);
            _mm256_storeu_si256(ap, _mm256_add_epi32(_mm256_loadu_si256(ap), s[1]));
        }
    }

    /// AVX-VNNI kernel (see [`super::TileFn`]); handed out only when the CPU has AVX2 and AVX-VNNI.
    pub(super) fn avxvnni_tile(
        xq: &[u8],
        stride: usize,
        rows: usize,
        block: &[Group],
        acc: &mut Acc,
    ) {
        check_tile(xq, stride, rows, block, AVXVNNI_ROWS);
        // SAFETY: the CPU has AVX2 and AVX-VNNI (`Int8Kernel::tile`, the only way to this
        // function, asserts it); the bounds were checked above and each instantiation reads rows
        // `0..R` of `xq`.
        unsafe {
            match rows {
                6 => avxvnni_rows::<6, 1>(xq, stride, block, acc),
                5 => avxvnni_rows::<5, 1>(xq, stride, block, acc),
                4 => avxvnni_rows::<4, 1>(xq, stride, block, acc),
                3 => avxvnni_rows::<3, 1>(xq, stride, block, acc),
                2 => avxvnni_rows::<2, 2>(xq, stride, block, acc),
                _ => avxvnni_rows::<1, 4>(xq, stride, block, acc),
            }
        }
    }

    /// `R` rows × 16 outputs, in `C` interleaved sets of 2·R accumulators (groups `g ≡ c mod C`
    /// go to set `c`: with few rows, independent chains hide `vpdpbusd`'s latency); per group one
    /// panel load (two ymm) and per row one broadcast and two `vpdpbusd`.
    #[target_feature(enable = "avx2,avxvnni")]
    unsafe fn avxvnni_rows<const R: usize, const C: usize>(
        xq: &[u8],
        stride: usize,
        block: &[Group],
        acc: &mut Acc,
    ) {
        let (xp, wp) = (xq.as_ptr(), block.as_ptr());
        let mut sums = [[[_mm256_setzero_si256(); 2]; R]; C];
        let whole = block.len() / C * C;
        for g in (0..whole).step_by(C) {
            for (c, set) in sums.iter_mut().enumerate() {
                avxvnni_step(set, xp, stride, wp, g + c);
            }
        }
        for g in whole..block.len() {
            avxvnni_step(&mut sums[0], xp, stride, wp, g);
        }
        let (first, others) = sums.split_at_mut(1);
        for set in others.iter() {
            for (s, t) in first[0].iter_mut().zip(set) {
                s[0] = _mm256_add_epi32(s[0], t[0]);
                s[1] = _mm256_add_epi32(s[1], t[1]);
            }
        }
        store_ymm(&sums[0], acc);
    }

    /// Group `g` into one set of AVX-VNNI accumulators: one panel load (two ymm), then per row
    /// one broadcast and two `vpdpbusd`.
    ///
    /// # Safety
    /// The CPU has AVX2 and AVX-VNNI; group `g` of `wp` and codes `g·GROUP ..+ 4` of rows
    /// `0..R` (`stride` apart) of `xp` are readable. Only called from [`avxvnni_rows`], into
    /// which it is inlined.
    #[inline(always)]
    unsafe fn avxvnni_step<const R: usize>(
        sums: &mut [[__m256i; 2]; R],
        xp: *const u8,
        stride: usize,
        wp: *const Group,
        g: usize,
    ) {
        let w = wp.add(g).cast::<__m256i>();
        let w0 = _mm256_load_si256(w);
        let w1 = _mm256_load_si256(w.add(1));
        for (r, s) in sums.iter_mut().enumerate() {
            let a = _mm256_set1_epi32(codes4(xp, stride, r, g));
            s[0] = _mm256_dpbusd_avx_epi32(s[0], a, w0);
            s[1] = _mm256_dpbusd_avx_epi32(s[1], a, w1);
        }
    }

    /// AVX512-VNNI kernel (see [`super::TileFn`]); handed out only when the CPU has AVX512F,
    /// AVX512BW and AVX512-VNNI.
    pub(super) fn avx512vnni_tile(
        xq: &[u8],
        stride: usize,
        rows: usize,
        block: &[Group],
        acc: &mut Acc,
    ) {
        check_tile(xq, stride, rows, block, AVX512VNNI_ROWS);
        // SAFETY: the CPU has AVX512F, AVX512BW and AVX512-VNNI (`Int8Kernel::tile`, the only
        // way to this function, asserts it); the bounds were checked above and each
        // instantiation reads rows `0..R` of `xq`.
        unsafe {
            match rows {
                16 => avx512_rows::<16, 1>(xq, stride, block, acc),
                15 => avx512_rows::<15, 1>(xq, stride, block, acc),
                14 => avx512_rows::<14, 1>(xq, stride, block, acc),
                13 => avx512_rows::<13, 1>(xq, stride, block, acc),
                12 => avx512_rows::<12, 1>(xq, stride, block, acc),
                11 => avx512_rows::<11, 1>(xq, stride, block, acc),
                10 => avx512_rows::<10, 1>(xq, stride, block, acc),
                9 => avx512_rows::<9, 1>(xq, stride, block, acc),
                8 => avx512_rows::<8, 1>(xq, stride, block, acc),
                7 => avx512_rows::<7, 1>(xq, stride, block, acc),
                6 => avx512_rows::<6, 1>(xq, stride, block, acc),
                5 => avx512_rows::<5, 1>(xq, stride, block, acc),
                4 => avx512_rows::<4, 2>(xq, stride, block, acc),
                3 => avx512_rows::<3, 2>(xq, stride, block, acc),
                2 => avx512_rows::<2, 4>(xq, stride, block, acc),
                _ => avx512_rows::<1, 4>(xq, stride, block, acc),
            }
        }
    }

    /// Group `g` into one set of AVX512-VNNI accumulators: one aligned 64-byte panel load, then
    /// per row one broadcast and one `vpdpbusd`.
    ///
    /// # Safety
    /// The CPU has AVX512F, AVX512BW and AVX512-VNNI; group `g` of `wp` and codes
    /// `g·GROUP ..+ 4` of rows `0..R` (`stride` apart) of `xp` are readable. Only called from
    /// [`avx512_rows`], into which it is inlined.
    #[inline(always)]
    unsafe fn avx512_step<const R: usize>(
        sums: &mut [__m512i; R],
        xp: *const u8,
        stride: usize,
        wp: *const Group,
        g: usize,
    ) {
        let w = _mm512_load_si512(wp.add(g).cast::<__m512i>());
        for (r, s) in sums.iter_mut().enumerate() {
            let a = _mm512_set1_epi32(codes4(xp, stride, r, g));
            *s = _mm512_dpbusd_epi32(*s, a, w);
        }
    }

    /// `R` rows × 16 outputs, one zmm per row in each of `C` interleaved sets (as in
    /// [`avxvnni_rows`]); per group one aligned 64-byte panel load and per row one broadcast and
    /// one `vpdpbusd`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn avx512_rows<const R: usize, const C: usize>(
        xq: &[u8],
        stride: usize,
        block: &[Group],
        acc: &mut Acc,
    ) {
        let (xp, wp) = (xq.as_ptr(), block.as_ptr());
        let mut sums = [[_mm512_setzero_si512(); R]; C];
        let whole = block.len() / C * C;
        for g in (0..whole).step_by(C) {
            for (c, set) in sums.iter_mut().enumerate() {
                avx512_step(set, xp, stride, wp, g + c);
            }
        }
        for g in whole..block.len() {
            avx512_step(&mut sums[0], xp, stride, wp, g);
        }
        for (r, a) in acc.iter_mut().enumerate().take(R) {
            let mut s = sums[0][r];
            for set in &sums[1..] {
                s = _mm512_add_epi32(s, set[r]);
            }
            let ap = a.as_mut_ptr().cast::<__m512i>();
            _mm512_storeu_si512(ap, _mm512_add_epi32(_mm512_loadu_si512(ap), s));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_abs_diff;

    /// A `(rows, cols)` matrix of N(0, σ) values, the same on every run for given arguments.
    fn randn(rows: usize, cols: usize, sigma: f32) -> Tensor {
        use rand::SeedableRng;
        use rand_distr::Distribution;
        let seed = (rows * 1_000_003 + cols) as u64 ^ u64::from(sigma.to_bits());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(0f32, sigma).expect("a valid σ");
        let v: Vec<f32> = (0..rows * cols).map(|_| normal.sample(&mut rng)).collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// The code of weight `(j, k)` read from the layout.
    fn code(w: &QuantizedWeight, j: usize, k: usize) -> i8 {
        let (groups, _, _) = w.view();
        groups[(j / PANEL) * w.groups_per_panel() + k / GROUP].0[(j % PANEL) * GROUP + k % GROUP]
    }

    /// The scheme computed directly: i64 sums over the layout's codes and the activation codes,
    /// then the f32 formula of the module docs, then `epilogue`.
    fn reference(
        w: &QuantizedWeight,
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
        epilogue: Option<Epilogue>,
    ) -> Vec<f32> {
        let (_, scales, colsums) = w.view();
        let acts = Activations::quantize(x, rows, w.inputs(), 0);
        let mut y = Vec::with_capacity(rows * w.outputs());
        for r in 0..rows {
            let (s, lo) = acts.params[r];
            let xq = &acts.codes[r * acts.stride..][..acts.stride];
            for j in 0..w.outputs() {
                let acc: i64 = (0..w.inputs())
                    .map(|k| i64::from(xq[k]) * i64::from(code(w, j, k)))
                    .sum();
                let acc = i32::try_from(acc).unwrap();
                let b = bias.map_or(0.0, |b| b[j]);
                y.push(scales[j] * (s * acc as f32 + lo * colsums[j] as f32) + b);
            }
        }
        if let Some(epilogue) = epilogue {
            epilogue(&mut y);
        }
        y
    }

    /// Equal bit for bit (NaN equal to NaN).
    fn assert_identical(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                "{what}: element {i}: {g} vs {w}"
            );
        }
    }

    fn double_plus_one(v: &mut [f32]) {
        v.iter_mut().for_each(|v| *v = *v * 2.0 + 1.0);
    }

    #[test]
    fn weights_quantize_as_specified() {
        let (outputs, inputs) = (37, 10);
        let mut w = values(&randn(outputs, inputs, 1.0));
        w[3 * inputs..4 * inputs].fill(0.0); // a zero row
        w[5 * inputs + 2] = 40.0; // one large value
        w[6 * inputs..7 * inputs].fill(-0.5); // a constant row
        let t = Tensor::from_vec(w.clone(), (outputs, inputs), &Device::Cpu).unwrap();
        let q = QuantizedWeight::quantize(&t).unwrap();
        let (groups, scales, colsums) = q.view();
        assert_eq!((q.outputs(), q.inputs()), (outputs, inputs));
        assert_eq!(groups.len(), 3 * 3);
        assert_eq!(q.bytes(), 9 * 64 + 48 * 4 + 48 * 4);
        for j in 0..3 * PANEL {
            let row = (j < outputs).then(|| &w[j * inputs..][..inputs]);
            let max = row.map_or(0.0, |r| r.iter().fold(0f32, |m, v| m.max(v.abs())));
            assert_eq!(scales[j], max / 127.0, "scale {j}");
            let mut sum = 0;
            for k in 0..12 {
                let want = match row {
                    Some(r) if k < inputs && max > 0.0 => {
                        let v = (r[k] / (max / 127.0)).round();
                        assert!((-127.0..=127.0).contains(&v));
                        v as i8
                    }
                    _ => 0, // a zero row, padding inputs or outputs
                };
                assert_eq!(code(&q, j, k), want, "code ({j}, {k})");
                sum += i32::from(want);
            }
            assert_eq!(colsums[j], sum, "colsum {j}");
        }
        assert_eq!(code(&q, 5, 2), 127);
        assert!((0..inputs).all(|k| code(&q, 6, k) == -127));
        // select_rows dequantizes: q·scale.
        let ids = Tensor::new(&[5u32, 3, 36], &Device::Cpu).unwrap();
        let rows = values(&q.select_rows(&ids).unwrap());
        for (i, &j) in [5usize, 3, 36].iter().enumerate() {
            for k in 0..inputs {
                assert_eq!(rows[i * inputs + k], f32::from(code(&q, j, k)) * scales[j]);
            }
        }
        assert!(q
            .select_rows(&Tensor::new(&[37u32], &Device::Cpu).unwrap())
            .unwrap_err()
            .to_string()
            .contains("index 37 out of range for 37 rows"));
        // Half-way values round away from zero.
        assert_eq!(weight_code(2.5, 1.0), 3);
        assert_eq!(weight_code(-2.5, 1.0), -3);
        assert_eq!(weight_code(-127.4, 1.0), -127);
    }

    #[test]
    fn weights_of_other_dtypes_and_layouts() {
        let w = randn(20, 12, 1.0);
        let q = QuantizedWeight::quantize(&w).unwrap();
        let ids = Tensor::arange(0u32, 20, &Device::Cpu).unwrap();
        let deq = q.select_rows(&ids).unwrap();
        for dtype in [DType::F16, DType::BF16] {
            let low = w.to_dtype(dtype).unwrap();
            let ql = QuantizedWeight::quantize(&low).unwrap();
            let want = QuantizedWeight::quantize(&low.to_dtype(DType::F32).unwrap()).unwrap();
            assert_eq!(
                max_abs_diff(
                    &ql.select_rows(&ids).unwrap(),
                    &want.select_rows(&ids).unwrap()
                ),
                0.0
            );
        }
        let transposed = w.t().unwrap().contiguous().unwrap().t().unwrap();
        let qt = QuantizedWeight::quantize(&transposed).unwrap();
        assert_eq!(max_abs_diff(&qt.select_rows(&ids).unwrap(), &deq), 0.0);
        // Dequantized within half a step of the original.
        let (_, scales, _) = q.view();
        let diff = (deq - &w).unwrap().abs().unwrap().to_vec2::<f32>().unwrap();
        for (j, row) in diff.iter().enumerate() {
            assert!(
                row.iter().all(|d| *d <= scales[j] / 2.0 * 1.0001),
                "row {j}"
            );
        }
        let ints = Tensor::zeros((2, 2), DType::U32, &Device::Cpu).unwrap();
        assert!(QuantizedWeight::quantize(&ints).is_err());
        let mut bad = values(&randn(3, 4, 1.0));
        bad[9] = f32::INFINITY;
        let bad = Tensor::from_vec(bad, (3, 4), &Device::Cpu).unwrap();
        let err = QuantizedWeight::quantize(&bad).unwrap_err().to_string();
        assert!(err.contains("row 2 holds a non-finite value"), "{err}");
        assert!(QuantizedWeight::quantize(&randn(2, 3, 1.0).reshape(6).unwrap()).is_err());
    }

    #[test]
    fn activations_quantize_as_specified() {
        let nan = f32::NAN;
        let rows: [Vec<f32>; 7] = [
            vec![-1.0, 0.0, 0.5, 2.0, 1.0],
            vec![3.0; 5],
            vec![-2.0, 1.0, nan, 0.0, 1.0],
            vec![-2.0, f32::INFINITY, 0.0, 0.0, 1.0],
            vec![0.0, 0.0, 0.0, 0.0, f32::NEG_INFINITY],
            vec![-3e38, 3e38, 0.0, 1.0, 2.0],
            values(&randn(1, 5, 1.0)),
        ];
        let x: Vec<f32> = rows.concat();
        let acts = Activations::quantize(&x, rows.len(), 5, 0);
        assert_eq!(acts.stride, 8);
        for (r, row) in rows.iter().enumerate() {
            let codes = &acts.codes[r * 8..][..8];
            assert_eq!(&codes[5..], &[0, 0, 0], "padding of row {r}");
            let (s, lo) = acts.params[r];
            if (2..=5).contains(&r) {
                assert!(s.is_nan() && lo.is_nan(), "row {r}");
                assert_eq!(&codes[..5], &[0; 5]);
                continue;
            }
            let min = row.iter().copied().fold(f32::INFINITY, f32::min);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(lo, min);
            assert_eq!(s, (max - min) / 254.0);
            for (k, &v) in row.iter().enumerate() {
                let want = if s == 0.0 {
                    0
                } else {
                    ((v - min) / s).round().clamp(0.0, 254.0) as u8
                };
                assert_eq!(codes[k], want, "row {r} input {k}");
            }
        }
        assert_eq!(acts.params[1], (0.0, 3.0));
        assert_eq!(&acts.codes[..5], &[0, 85, 127, 254, 169]);
        // Half-way codes round up (away from zero): 0.5 − 0 over s = 1 is half a step.
        let acts = Activations::quantize(&[0.0, 0.5, 254.0], 1, 3, 0);
        assert_eq!(&acts.codes[..3], &[0, 1, 254]);
        // An offset is subtracted from every code, wrapping (the AVX2 kernel's i8 codes).
        let shifted = Activations::quantize(&[0.0, 0.5, 254.0], 1, 3, 127);
        assert_eq!(&shifted.codes[..3], &[129, 130, 127]); // −127, −126, 127 as i8
        assert_eq!(shifted.params, acts.params);
        // Many rows take the parallel path, with the same result per row.
        let many = values(&randn(64, 600, 1.0));
        let all = Activations::quantize(&many, 64, 600, 0);
        for r in [0, 31, 63] {
            let one = Activations::quantize(&many[r * 600..][..600], 1, 600, 0);
            assert_eq!(&all.codes[r * 600..][..600], &one.codes[..]);
            assert_eq!(all.params[r], one.params[0]);
        }
        let empty = Activations::quantize(&[], 3, 0, 0);
        assert_eq!((empty.stride, empty.params), (0, vec![(0.0, 0.0); 3]));
    }

    /// Every kernel this CPU runs (real or emulated) gives the reference's outputs bit for bit:
    /// whole and partial panels, inputs not a multiple of 4 and across several blocks, 1–80
    /// rows, bias and epilogue.
    #[test]
    fn every_kernel_matches_the_reference_exactly() {
        let kernels = Int8Kernel::supported();
        eprintln!(
            "int8 kernels run here: {:?}",
            kernels.iter().map(|k| k.name()).collect::<Vec<_>>()
        );
        for (outputs, inputs) in [
            (48, 40),
            (37, 23),
            (5, 7),
            (16, 1),
            (33, 4 * DEPTH_GROUPS + 5),
        ] {
            let w = QuantizedWeight::quantize(&randn(outputs, inputs, 1.0)).unwrap();
            let bias = values(&randn(1, outputs, 1.0));
            for rows in [1, 2, 3, 4, 5, 6, 7, 13, 16, 17, 33, 80] {
                if inputs > 1000 && ![1, 6, 17, 80].contains(&rows) {
                    continue;
                }
                let x = values(&randn(rows, inputs, 2.0));
                let plain = reference(&w, &x, rows, None, None);
                let full = reference(&w, &x, rows, Some(&bias), Some(double_plus_one));
                for &k in &kernels {
                    let what = format!("{} ({outputs}, {inputs}) × {rows} rows", k.name());
                    let got = w.product(&x, rows, None, k, None);
                    assert_identical(&got, &plain, &what);
                    let got = w.product(&x, rows, Some(&bias), k, Some(double_plus_one));
                    assert_identical(&got, &full, &format!("{what}, bias and epilogue"));
                }
            }
        }
    }

    /// The tile kernels' i32 sums against i64 sums for every row count they take, on values at
    /// the ends of the ranges (activation codes 0 and 254, weight codes ±127 and −128), one block
    /// deep, each kernel reading the codes as it stores them (`xq − offset`).
    #[test]
    fn tile_sums_are_exact() {
        let groups = DEPTH_GROUPS;
        let block: Vec<Group> = (0..groups)
            .map(|g| {
                let mut b = [0i8; GROUP * PANEL];
                for (i, v) in b.iter_mut().enumerate() {
                    *v = match (g + i) % 5 {
                        0 => 127,
                        1 => -127,
                        2 => 0,
                        _ => ((g * 31 + i * 7) % 255) as i8,
                    };
                }
                Group(b)
            })
            .collect();
        let stride = groups * GROUP + 12;
        let xq: Vec<u8> = (0..MAX_TILE_ROWS * stride)
            .map(|i| match i % 4 {
                0 => MAX_CODE,
                1 => 0,
                _ => (i * 13 % (usize::from(MAX_CODE) + 1)) as u8,
            })
            .collect();
        for k in Int8Kernel::supported() {
            let tile = k.tile();
            // The codes as the kernel reads them: u8, or i8 `xq − 127`.
            let stored: Vec<u8> = xq
                .iter()
                .map(|c| c.wrapping_sub(tile.code_offset))
                .collect();
            let read = |c: u8| -> i64 {
                if tile.code_offset == 0 {
                    i64::from(c)
                } else {
                    i64::from(c as i8)
                }
            };
            for rows in 1..=tile.rows {
                let mut acc = [[7i32; PANEL]; MAX_TILE_ROWS];
                (tile.add)(&stored, stride, rows, &block, &mut acc);
                for (r, a) in acc.iter().enumerate() {
                    for (j, &a) in a.iter().enumerate() {
                        let want: i64 = if r < rows {
                            7 + (0..groups * GROUP)
                                .map(|i| {
                                    read(stored[r * stride + i])
                                        * i64::from(block[i / GROUP].0[j * GROUP + i % GROUP])
                                })
                                .sum::<i64>()
                        } else {
                            7 // rows past the tile are left alone
                        };
                        assert_eq!(i64::from(a), want, "{} rows {rows} ({r}, {j})", k.name());
                    }
                }
            }
        }
    }

    /// The quantized product is close to the f32 one: on N(0, 1) weights and activations the
    /// error's RMS is 1.2–1.9% of the outputs' RMS (asserted below 2.5%) and its largest value
    /// 5–8% of it (asserted below 10%).
    #[test]
    fn accuracy_against_f32() {
        for (outputs, inputs, rows) in [(3072, 768, 5), (768, 3072, 5), (100, 64, 80)] {
            let w = randn(outputs, inputs, 1.0);
            let x = randn(rows, inputs, 1.0);
            let q = QuantizedWeight::quantize(&w).unwrap();
            let got = q.linear(&x, None).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            let err = (got - &want).unwrap();
            let rms = |t: &Tensor| {
                let v = values(t);
                (v.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
            };
            let scale = rms(&want);
            let rms_err = rms(&err) / scale;
            let max_err = max_abs_diff(&err, &err.zeros_like().unwrap()) / scale;
            eprintln!(
                "int8 {inputs} → {outputs}, {rows} rows: error RMS {:.2}%, max {:.2}% of the \
                 output RMS",
                100.0 * rms_err,
                100.0 * max_err
            );
            assert!(rms_err < 0.025 && max_err < 0.10, "{rms_err} {max_err}");
        }
    }

    #[test]
    fn products_through_the_api() {
        let w = randn(50, 24, 1.0);
        let q = QuantizedWeight::quantize(&w).unwrap();
        let bias = values(&randn(1, 50, 1.0));
        let x = randn(9, 24, 1.0);
        let xs = values(&x);
        let kernel = Int8Kernel::selected().unwrap();
        let want = reference(&q, &xs, 9, Some(&bias), None);
        let got = q.linear(&x, Some(&bias)).unwrap();
        assert_eq!(got.dims(), &[9, 50]);
        assert_identical(&values(&got), &want, kernel.name());
        assert_identical(&q.linear_to_host(&x, Some(&bias)).unwrap(), &want, "host");
        let then = q
            .linear_then(&x, Some(&bias), Some(double_plus_one))
            .unwrap();
        let want = reference(&q, &xs, 9, Some(&bias), Some(double_plus_one));
        assert_identical(&values(&then), &want, "epilogue");
        // A strided input is read as its values.
        let xt = x.t().unwrap().contiguous().unwrap().t().unwrap();
        assert_identical(
            &values(&q.linear(&xt, None).unwrap()),
            &reference(&q, &xs, 9, None, None),
            "strided",
        );
    }

    /// Panel views compute their own outputs.
    #[test]
    fn views_share_the_panels() {
        let w = randn(3 * PANEL + 3, 9, 1.0);
        let q = QuantizedWeight::quantize(&w).unwrap();
        let x = randn(7, 9, 1.0);
        let full = q.linear(&x, None).unwrap();
        let ids = Tensor::arange(0u32, w.dim(0).unwrap() as u32, &Device::Cpu).unwrap();
        let deq = q.select_rows(&ids).unwrap();
        for (from, len) in [(0, PANEL), (PANEL, 2 * PANEL), (2 * PANEL, PANEL + 3)] {
            let view = q.narrow_outputs(from, len).unwrap();
            assert_eq!(
                (view.outputs(), view.inputs(), view.bytes()),
                (len, 9, q.bytes())
            );
            let got = view.linear(&x, None).unwrap();
            assert_eq!(max_abs_diff(&got, &full.narrow(1, from, len).unwrap()), 0.0);
            let ids = Tensor::arange(0u32, len as u32, &Device::Cpu).unwrap();
            assert_eq!(
                max_abs_diff(
                    &view.select_rows(&ids).unwrap(),
                    &deq.narrow(0, from, len).unwrap()
                ),
                0.0
            );
            let bias = values(&randn(1, len, 1.0));
            let xs = values(&x);
            for k in Int8Kernel::supported() {
                let got = view.product(&xs, 7, Some(&bias), k, None);
                assert_identical(&got, &reference(&view, &xs, 7, Some(&bias), None), k.name());
            }
        }
        let inner = q.narrow_outputs(PANEL, 2 * PANEL).unwrap();
        let nested = inner.narrow_outputs(PANEL, PANEL).unwrap();
        let got = nested.linear(&x, None).unwrap();
        assert_eq!(
            max_abs_diff(&got, &full.narrow(1, 2 * PANEL, PANEL).unwrap()),
            0.0
        );
        assert!(q.narrow_outputs(3, PANEL).is_err());
        assert!(q.narrow_outputs(0, PANEL + 1).is_err());
        assert!(q.narrow_outputs(PANEL, 3 * PANEL).is_err());
    }

    #[test]
    fn mismatches_and_edge_cases() {
        let dev = Device::Cpu;
        let q =
            QuantizedWeight::quantize(&Tensor::ones((5, 8), DType::F32, &dev).unwrap()).unwrap();
        let x = Tensor::zeros((3, 7), DType::F32, &dev).unwrap();
        assert!(q.linear(&x, None).is_err());
        let x = Tensor::zeros((3, 8), DType::F32, &dev).unwrap();
        assert!(q.linear(&x, Some(&[0.0; 4])).is_err());
        assert!(q.linear(&x.to_dtype(DType::F16).unwrap(), None).is_err());
        // A zero row of x (hi == lo == 0) gives the bias.
        let y = q.linear(&x, Some(&[1.0; 5])).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![1.0; 5]; 3]);
        // A constant row is exact: lo·colsum·scale.
        let c = Tensor::full(0.25f32, (2, 8), &dev).unwrap();
        assert_eq!(
            q.linear(&c, None).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![2.0; 5]; 2]
        );
        let empty = Tensor::zeros((0, 8), DType::F32, &dev).unwrap();
        assert_eq!(q.linear(&empty, None).unwrap().dims(), &[0, 5]);
        // No inputs: the bias; no outputs: nothing.
        let none =
            QuantizedWeight::quantize(&Tensor::zeros((3, 0), DType::F32, &dev).unwrap()).unwrap();
        let x0 = Tensor::zeros((2, 0), DType::F32, &dev).unwrap();
        assert_eq!(
            none.linear(&x0, Some(&[1.0, 2.0, 3.0]))
                .unwrap()
                .to_vec2::<f32>()
                .unwrap(),
            vec![vec![1.0, 2.0, 3.0]; 2]
        );
        let no_out =
            QuantizedWeight::quantize(&Tensor::zeros((0, 8), DType::F32, &dev).unwrap()).unwrap();
        assert_eq!(no_out.linear(&x, None).unwrap().dims(), &[3, 0]);
        // Non-finite activations: NaN across their own row only, for every kernel.
        let w = QuantizedWeight::quantize(&randn(20, 8, 1.0)).unwrap();
        let mut xs = values(&randn(4, 8, 1.0));
        xs[3] = f32::NAN;
        xs[8 + 5] = f32::INFINITY;
        xs[16] = f32::NEG_INFINITY;
        for k in Int8Kernel::supported() {
            let y = w.product(&xs, 4, None, k, None);
            assert!(y[..60].iter().all(|v| v.is_nan()), "{}", k.name());
            assert!(y[60..].iter().all(|v| v.is_finite()), "{}", k.name());
        }
    }

    #[test]
    fn kernel_choice() {
        let best = Int8Kernel::choose(None).unwrap();
        assert!(best.is_supported());
        assert_eq!(Some(&best), Int8Kernel::supported().last());
        assert_eq!(Int8Kernel::choose(Some(" ")).unwrap(), best);
        for &k in Int8Kernel::ALL {
            match Int8Kernel::choose(Some(k.name())) {
                Ok(chosen) => assert!(k.is_supported() && chosen == k),
                Err(e) => {
                    assert!(!k.is_supported());
                    let e = e.to_string();
                    assert!(e.contains("cannot run it") && e.contains("portable"), "{e}");
                }
            }
        }
        let e = Int8Kernel::choose(Some("avx3")).unwrap_err().to_string();
        assert!(
            e.contains("unknown int8 kernel") && e.contains("avx512vnni"),
            "{e}"
        );
        // The products use the kernel the environment asks for.
        match std::env::var(KERNEL_ENV) {
            Ok(name) if !name.trim().is_empty() => match Int8Kernel::choose(Some(&name)) {
                Ok(k) => assert_eq!(Int8Kernel::selected().unwrap(), k),
                Err(_) => assert!(Int8Kernel::selected().is_err()),
            },
            _ => assert_eq!(Int8Kernel::selected().unwrap(), best),
        }
    }

    #[test]
    fn tiles_cover_the_rows_evenly() {
        for max in [PORTABLE_ROWS, 6, MAX_TILE_ROWS] {
            for rows in 1usize..200 {
                let tiles = rows.div_ceil(max);
                let mut next = 0;
                for t in 0..tiles {
                    let (first, count) = tile_span(rows, tiles, t);
                    assert_eq!(first, next);
                    assert!((1..=max).contains(&count));
                    next += count;
                }
                assert_eq!(next, rows);
            }
        }
    }
}
