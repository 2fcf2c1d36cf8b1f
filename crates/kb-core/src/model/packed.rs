//! Frozen f32 weight matrices stored in the layout the CPU product kernel reads, for inference.
//!
//! A linear layer's weight `W` `(out, in)` is stored as panels of [`PANEL`] consecutive output
//! features: panel `p` holds, for every input feature `k` in order, the [`PANEL`] values
//! `W[p·PANEL + j][k]` side by side (outputs past `out` are zero). `y = x Wᵀ + b` then walks each
//! panel once, front to back, while a tile of rows of `x` ([`TILE_ROWS`] for AVX2,
//! [`AVX512_TILE_ROWS`] for AVX-512) accumulates `rows × PANEL` outputs in registers.
//!
//! Why: a general GEMM (candle's, via the `gemm` crate) copies ("packs") the weight into such
//! blocks on every call. At decoding shapes every weight is used once per step by few rows
//! (5 for one query's beams, 80 for 16 queries), so that copy is a pass over all 473 MiB of
//! KoBART's weights per step on top of the product — measured at 14–17% of a 16-query decoding
//! step, and the main cost with a few rows. Packed once at load, the weights are read straight
//! from memory in order (the hardware prefetcher's best case) by the kernel. Measured on 2 Zen 4
//! cores, one decoder step's products (six layers and the LM head, cache-cold) at 80 rows:
//! 68–78 ms vs ~100 ms split over `gemm` calls; at 5 rows: 14–17 ms vs 31–32 ms for candle's
//! product.
//!
//! The packed matrix replaces the loaded one (same size, no second copy). Rows of it can be
//! read back ([`PackedWeight::select_rows`]), so the token embedding that doubles as the LM head
//! is packed once for both uses.
//!
//! Kernels ([`F32Kernel`], chosen once at run time; `KB_F32_KERNEL` forces one): AVX-512F where
//! the CPU has it, else AVX2 + FMA, else portable Rust that the compiler vectorises for the
//! target. Sums run over the input features in order, starting from the bias: results differ
//! from candle's product by float rounding (≈1e-6 relative). The AVX2 and AVX-512 kernels both
//! fuse each multiply-add (FMA) in that same order, so they give the same bits.
//!
//! AVX-512 (why a kernel of its own): a panel row of 16 outputs is one zmm register instead of
//! two ymm, so each input feature costs one load of the panel and one FMA per row instead of two
//! of each, and the 32 registers hold [`AVX512_TILE_ROWS`] rows of accumulators (AVX2's 16
//! registers hold 6 rows × 2): the panel is read from L1 once per 14 rows instead of once per 6.
//! It has not been measured nor run: the machines this project runs on (AMD Zen 3) lack AVX-512,
//! and QEMU's TCG does not implement it. Its tests (the same as the AVX2 kernel's, plus equality
//! with the AVX2 kernel bit for bit) run where the CPU has AVX-512F; until they have, a CPU with
//! AVX-512 can be kept on the AVX2 kernel with `KB_F32_KERNEL=avx2`.

use std::sync::{Arc, OnceLock};

use candle_core::{CpuStorage, DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::panel_product::{
    check_operands, product_by_panels, selected_kernel, tile_span, KernelFamily,
};

/// Output features per panel.
pub const PANEL: usize = 16;

/// Rows of `x` per register tile of the portable and AVX2 kernels (6 × 16 accumulators fill 12
/// of AVX2's 16 registers).
pub const TILE_ROWS: usize = 6;

/// Rows of `x` per register tile of the AVX-512 kernel (14 zmm accumulators and the panel row,
/// of 32 registers).
pub const AVX512_TILE_ROWS: usize = 14;

/// The most rows any kernel handles in one tile.
const MAX_TILE_ROWS: usize = AVX512_TILE_ROWS;

/// Environment variable that forces a kernel (`portable`, `avx2` or `avx512`).
pub const KERNEL_ENV: &str = "KB_F32_KERNEL";

/// A frozen `(outputs, inputs)` f32 weight matrix in panels (see the module docs). Cloning
/// shares the data; [`PackedWeight::narrow_outputs`] views a range of panels without a copy.
#[derive(Clone)]
pub struct PackedWeight {
    data: Arc<Vec<f32>>,
    /// First panel of this view in `data`.
    first_panel: usize,
    outputs: usize,
    inputs: usize,
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeight")
            .field("outputs", &self.outputs)
            .field("inputs", &self.inputs)
            .finish()
    }
}

/// Whether `t` can be packed or multiplied by a packed weight: f32 on the CPU.
fn applies(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// Runs `f` on the f32 values of a CPU tensor (made contiguous first) without copying them.
fn with_contiguous_f32<R>(
    t: &Tensor,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    with_f32_slices([&t.contiguous()?], |[values]| f(values))?
}

/// Runs `f` on the values of contiguous f32 CPU tensors, without copies.
pub(crate) fn with_f32_slices<const N: usize, R>(
    tensors: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> R,
) -> candle_core::Result<R> {
    let guards = tensors.map(|t| t.storage_and_layout());
    let mut slices: [&[f32]; N] = [&[]; N];
    for (slot, (storage, layout)) in slices.iter_mut().zip(&guards) {
        match (&**storage, layout.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) => *slot = &data[a..b],
            _ => candle_core::bail!("expected contiguous f32 tensors on the CPU"),
        }
    }
    Ok(f(slices))
}

impl PackedWeight {
    /// Packs `weight` `(outputs, inputs)` (f32 on the CPU, any strides).
    pub fn pack(weight: &Tensor) -> candle_core::Result<Self> {
        if !applies(weight) {
            candle_core::bail!(
                "packed weight: expected an f32 CPU tensor, got {:?} on {:?}",
                weight.dtype(),
                weight.device()
            );
        }
        let (outputs, inputs) = weight.dims2()?;
        // Read in place when the weight is contiguous (the loaded case): no transient copy of
        // a matrix as large as the 30000-token embedding.
        let data = with_contiguous_f32(weight, |dense| {
            Ok(Self::panels_from(dense, outputs, inputs))
        })?;
        Ok(Self {
            data: Arc::new(data), // no copy (a `Vec` into `Arc<[f32]>` would reallocate)
            first_panel: 0,
            outputs,
            inputs,
        })
    }

    /// The packed form of `weight` when it is frozen f32 on the CPU — what inference packs —
    /// and `None` for a trainable variable or another dtype or device.
    pub fn pack_frozen(weight: &Tensor) -> candle_core::Result<Option<Self>> {
        if weight.is_variable() || !applies(weight) {
            return Ok(None);
        }
        Self::pack(weight).map(Some)
    }

    /// The panels of the row-major `(outputs, inputs)` matrix `dense`.
    fn panels_from(dense: &[f32], outputs: usize, inputs: usize) -> Vec<f32> {
        let panels = outputs.div_ceil(PANEL);
        let mut data = vec![0f32; panels * inputs * PANEL];
        data.par_chunks_mut(inputs * PANEL)
            .enumerate()
            .for_each(|(p, panel)| {
                for j in 0..PANEL.min(outputs - p * PANEL) {
                    let row = &dense[(p * PANEL + j) * inputs..][..inputs];
                    for (k, &v) in row.iter().enumerate() {
                        panel[k * PANEL + j] = v;
                    }
                }
            });
        data
    }

    /// Output features (rows of `W`).
    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Input features (columns of `W`).
    pub fn inputs(&self) -> usize {
        self.inputs
    }

    /// Bytes held by the packed data. Views made by [`PackedWeight::narrow_outputs`] share one
    /// allocation and each report all of it.
    pub fn bytes(&self) -> usize {
        std::mem::size_of_val(&self.data[..])
    }

    /// The panels of this view.
    fn panels(&self) -> &[f32] {
        let len = self.outputs.div_ceil(PANEL) * self.inputs * PANEL;
        &self.data[self.first_panel * self.inputs * PANEL..][..len]
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
                "packed weight: outputs {from}..{end} of {} are not whole panels of {PANEL}",
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

    /// Rows `ids` of `W` (a lookup in the matrix as an embedding table), `(ids.len(), inputs)`.
    pub fn select_rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let ids = ids.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        let panels = self.panels();
        let mut out: Vec<f32> = Vec::with_capacity(ids.len() * self.inputs);
        for &id in &ids {
            let id = id as usize;
            if id >= self.outputs {
                candle_core::bail!("index {id} out of range for {} rows", self.outputs);
            }
            let panel = &panels[(id / PANEL) * self.inputs * PANEL..][..self.inputs * PANEL];
            out.extend(panel.iter().skip(id % PANEL).step_by(PANEL));
        }
        Tensor::from_vec(out, (ids.len(), self.inputs), &Device::Cpu)
    }

    /// `x Wᵀ (+ bias)` for `x` `(rows, inputs)` (f32 on the CPU): `(rows, outputs)`.
    pub fn linear(&self, x: &Tensor, bias: Option<&[f32]>) -> candle_core::Result<Tensor> {
        self.linear_then(x, bias, None)
    }

    /// [`PackedWeight::linear`] followed by `epilogue` on the outputs (e.g. the activation of a
    /// feed-forward layer), applied to each block of results while it is still in cache, on
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

    /// [`PackedWeight::linear`] returning the `rows × outputs` result as host values
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
        let rows = check_operands("packed linear", x, self.outputs, self.inputs, bias)?;
        let kernel = F32Kernel::selected()?;
        with_contiguous_f32(x, |x| Ok(self.product(x, rows, bias, kernel, epilogue)))
    }

    /// `x Wᵀ (+ bias)`, then `epilogue`, with the given tile kernel; `x` holds `rows × inputs`
    /// values.
    fn product(
        &self,
        x: &[f32],
        rows: usize,
        bias: Option<&[f32]>,
        kernel: F32Kernel,
        epilogue: Option<Epilogue>,
    ) -> Vec<f32> {
        let (outputs, inputs) = (self.outputs, self.inputs);
        let tile = kernel.tile();
        let tiles = rows.div_ceil(tile.rows).max(1);
        let panels = self.panels();
        product_by_panels(
            rows,
            outputs,
            epilogue,
            || vec![[0f32; MAX_TILE_ROWS * PANEL]; tiles],
            |acc, out| {
                let p = out.panel();
                let panel = &panels[p * inputs * PANEL..][..inputs * PANEL];
                let mut start = [0f32; PANEL];
                if let Some(b) = bias {
                    start[..out.width()].copy_from_slice(&b[p * PANEL..][..out.width()]);
                }
                for (t, a) in acc.iter_mut().enumerate() {
                    let (_, tile_rows) = tile_span(rows, tiles, t);
                    for r in a.chunks_exact_mut(PANEL).take(tile_rows) {
                        r.copy_from_slice(&start);
                    }
                }
                // The panel in blocks of DEPTH inputs: one block stays in L1 across tiles.
                for k0 in (0..inputs).step_by(DEPTH) {
                    let depth = DEPTH.min(inputs - k0);
                    let block = &panel[k0 * PANEL..][..depth * PANEL];
                    for (t, a) in acc.iter_mut().enumerate() {
                        let (r0, tile_rows) = tile_span(rows, tiles, t);
                        let xs = &x[r0 * inputs + k0..][..(tile_rows - 1) * inputs + depth];
                        (tile.add)(xs, inputs, tile_rows, depth, block, a);
                    }
                }
                for (t, a) in acc.iter_mut().enumerate() {
                    let (_, tile_rows) = tile_span(rows, tiles, t);
                    out.write(&mut a[..tile_rows * PANEL]);
                }
            },
        )
    }

    /// The dense `(outputs, inputs)` matrix again.
    #[cfg(test)]
    fn unpack(&self) -> Tensor {
        let ids = Tensor::arange(0u32, self.outputs as u32, &Device::Cpu).unwrap();
        self.select_rows(&ids).unwrap()
    }
}

/// An element-wise function applied in place to a product's outputs ([`PackedWeight::linear_then`]).
pub type Epilogue = fn(&mut [f32]);

/// Inputs per block of a panel (16 KiB of it: stays in L1 while every row tile reads it).
const DEPTH: usize = 256;

/// A tile kernel: for `rows` (1 to its [`Tile::rows`]) rows of `x` (row `r` starts at
/// `r·stride`, `depth` values) and a panel block (`depth × PANEL` values), adds
/// `Σₖ x[r][k]·block[k][j]` to `acc[r·PANEL + j]`, over `k` in order.
type TileFn = fn(&[f32], usize, usize, usize, &[f32], &mut [f32; MAX_TILE_ROWS * PANEL]);

/// A tile function and the most rows it takes.
#[derive(Clone, Copy)]
struct Tile {
    rows: usize,
    add: TileFn,
}

/// An f32 product kernel. Each sums in the same order; the AVX2 and AVX-512 ones fuse the
/// multiply-adds (and so give the same bits), the portable one rounds each product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Kernel {
    /// Plain Rust loops that the compiler vectorises for the target: any CPU.
    Portable,
    /// AVX2 + FMA: 6 rows × 16 outputs in 12 ymm accumulators.
    Avx2,
    /// AVX-512F: one zmm accumulator per row, 14 rows.
    Avx512,
}

impl KernelFamily for F32Kernel {
    const ALL: &'static [Self] = &[F32Kernel::Portable, F32Kernel::Avx2, F32Kernel::Avx512];
    const ENV: &'static str = KERNEL_ENV;
    const WHAT: &'static str = "f32";

    fn name(self) -> &'static str {
        match self {
            F32Kernel::Portable => "portable",
            F32Kernel::Avx2 => "avx2",
            F32Kernel::Avx512 => "avx512",
        }
    }

    fn needs(self) -> &'static str {
        match self {
            F32Kernel::Portable => "nothing",
            F32Kernel::Avx2 => "AVX2 and FMA",
            F32Kernel::Avx512 => "AVX512F",
        }
    }

    fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                F32Kernel::Portable => true,
                F32Kernel::Avx2 => {
                    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
                }
                F32Kernel::Avx512 => is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == F32Kernel::Portable
        }
    }
}

impl F32Kernel {
    /// The kernel the products use (see [`selected_kernel`]).
    pub fn selected() -> candle_core::Result<F32Kernel> {
        static SELECTED: OnceLock<Result<F32Kernel, String>> = OnceLock::new();
        selected_kernel(&SELECTED)
    }

    /// The tile function and its rows per tile. Panics if the CPU cannot run the kernel (the
    /// x86 tile functions rely on that check).
    fn tile(self) -> Tile {
        assert!(
            self.is_supported(),
            "the {} f32 kernel on a CPU without it",
            self.name()
        );
        match self {
            F32Kernel::Portable => Tile {
                rows: TILE_ROWS,
                add: portable_tile,
            },
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Avx2 => Tile {
                rows: TILE_ROWS,
                add: avx2::tile,
            },
            #[cfg(target_arch = "x86_64")]
            F32Kernel::Avx512 => Tile {
                rows: AVX512_TILE_ROWS,
                add: avx512::tile,
            },
            #[cfg(not(target_arch = "x86_64"))]
            _ => unreachable!("only the portable kernel is supported off x86-64"),
        }
    }
}

/// Panics unless a kernel's arguments are in bounds: 1 to `max_rows` rows of `depth` values
/// `stride` apart in `x`, and `depth` panel rows in `block`.
fn check_tile(x: &[f32], stride: usize, rows: usize, depth: usize, block: &[f32], max_rows: usize) {
    assert!((1..=max_rows).contains(&rows), "{rows} rows in a tile");
    assert!(block.len() >= depth * PANEL && x.len() >= (rows - 1) * stride + depth);
}

/// Portable kernel: plain loops over fixed-size arrays, vectorised by the compiler.
fn portable_tile(
    x: &[f32],
    stride: usize,
    rows: usize,
    depth: usize,
    block: &[f32],
    acc: &mut [f32; MAX_TILE_ROWS * PANEL],
) {
    check_tile(x, stride, rows, depth, block, TILE_ROWS);
    let mut sums = [[0f32; PANEL]; TILE_ROWS];
    for (r, s) in sums[..rows].iter_mut().enumerate() {
        s.copy_from_slice(&acc[r * PANEL..][..PANEL]);
    }
    for (k, w) in block.chunks_exact(PANEL).take(depth).enumerate() {
        for (r, s) in sums[..rows].iter_mut().enumerate() {
            let xv = x[r * stride + k];
            for (s, w) in s.iter_mut().zip(w) {
                *s += xv * w;
            }
        }
    }
    for (r, s) in sums[..rows].iter().enumerate() {
        acc[r * PANEL..][..PANEL].copy_from_slice(s);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{MAX_TILE_ROWS, PANEL, TILE_ROWS};

    /// AVX2 + FMA kernel (see [`super::TileFn`]); handed out only when the CPU has both.
    pub(super) fn tile(
        x: &[f32],
        stride: usize,
        rows: usize,
        depth: usize,
        block: &[f32],
        acc: &mut [f32; MAX_TILE_ROWS * PANEL],
    ) {
        super::check_tile(x, stride, rows, depth, block, TILE_ROWS);
        // SAFETY: the CPU has AVX2 and FMA (`F32Kernel::tile`, the only way to this function,
        // asserts it); the bounds were checked above and each instantiation reads rows `0..R`
        // of `x` and writes rows `0..R ≤ MAX_TILE_ROWS` of `acc`.
        unsafe {
            match rows {
                6 => rows_tile::<6>(x, stride, depth, block, acc),
                5 => rows_tile::<5>(x, stride, depth, block, acc),
                4 => rows_tile::<4>(x, stride, depth, block, acc),
                3 => rows_tile::<3>(x, stride, depth, block, acc),
                2 => rows_tile::<2>(x, stride, depth, block, acc),
                _ => rows_tile::<1>(x, stride, depth, block, acc),
            }
        }
    }

    /// `R` rows × 16 outputs in 2·R registers; per input feature one panel row (two loads) and
    /// one broadcast per row.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_tile<const R: usize>(
        x: &[f32],
        stride: usize,
        depth: usize,
        block: &[f32],
        acc: &mut [f32; MAX_TILE_ROWS * PANEL],
    ) {
        let (xp, wp, ap) = (x.as_ptr(), block.as_ptr(), acc.as_mut_ptr());
        let mut sums = [[_mm256_setzero_ps(); 2]; R];
        for (r, s) in sums.iter_mut().enumerate() {
            s[0] = _mm256_loadu_ps(ap.add(r * PANEL));
            s[1] = _mm256_loadu_ps(ap.add(r * PANEL + 8));
        }
        for k in 0..depth {
            let w0 = _mm256_loadu_ps(wp.add(k * PANEL));
            let w1 = _mm256_loadu_ps(wp.add(k * PANEL + 8));
            for (r, s) in sums.iter_mut().enumerate() {
                let xv = _mm256_broadcast_ss(&*xp.add(r * stride + k));
                s[0] = _mm256_fmadd_ps(xv, w0, s[0]);
                s[1] = _mm256_fmadd_ps(xv, w1, s[1]);
            }
        }
        for (r, s) in sums.iter().enumerate() {
            _mm256_storeu_ps(ap.add(r * PANEL), s[0]);
            _mm256_storeu_ps(ap.add(r * PANEL + 8), s[1]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{AVX512_TILE_ROWS, MAX_TILE_ROWS, PANEL};

    /// AVX-512F kernel (see [`super::TileFn`]); handed out only when the CPU has AVX-512F.
    pub(super) fn tile(
        x: &[f32],
        stride: usize,
        rows: usize,
        depth: usize,
        block: &[f32],
        acc: &mut [f32; MAX_TILE_ROWS * PANEL],
    ) {
        super::check_tile(x, stride, rows, depth, block, AVX512_TILE_ROWS);
        // SAFETY: the CPU has AVX-512F (`F32Kernel::tile`, the only way to this function,
        // asserts it); the bounds were checked above, each instantiation reads rows `0..R` of
        // `x` and `depth` panel rows of `block`, and writes rows `0..R ≤ MAX_TILE_ROWS` of `acc`.
        unsafe {
            match rows {
                14 => rows_tile::<14>(x, stride, depth, block, acc),
                13 => rows_tile::<13>(x, stride, depth, block, acc),
                12 => rows_tile::<12>(x, stride, depth, block, acc),
                11 => rows_tile::<11>(x, stride, depth, block, acc),
                10 => rows_tile::<10>(x, stride, depth, block, acc),
                9 => rows_tile::<9>(x, stride, depth, block, acc),
                8 => rows_tile::<8>(x, stride, depth, block, acc),
                7 => rows_tile::<7>(x, stride, depth, block, acc),
                6 => rows_tile::<6>(x, stride, depth, block, acc),
                5 => rows_tile::<5>(x, stride, depth, block, acc),
                4 => rows_tile::<4>(x, stride, depth, block, acc),
                3 => rows_tile::<3>(x, stride, depth, block, acc),
                2 => rows_tile::<2>(x, stride, depth, block, acc),
                _ => rows_tile::<1>(x, stride, depth, block, acc),
            }
        }
    }

    /// `R` rows × 16 outputs in `R` zmm registers; per input feature one panel row (one load)
    /// and per row one broadcast and one FMA — the AVX2 kernel's operations, in its order, on
    /// one register instead of two.
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_tile<const R: usize>(
        x: &[f32],
        stride: usize,
        depth: usize,
        block: &[f32],
        acc: &mut [f32; MAX_TILE_ROWS * PANEL],
    ) {
        let (xp, wp, ap) = (x.as_ptr(), block.as_ptr(), acc.as_mut_ptr());
        let mut sums = [_mm512_setzero_ps(); R];
        for (r, s) in sums.iter_mut().enumerate() {
            *s = _mm512_loadu_ps(ap.add(r * PANEL));
        }
        for k in 0..depth {
            let w = _mm512_loadu_ps(wp.add(k * PANEL));
            for (r, s) in sums.iter_mut().enumerate() {
                let xv = _mm512_set1_ps(*xp.add(r * stride + k));
                *s = _mm512_fmadd_ps(xv, w, *s);
            }
        }
        for (r, s) in sums.iter().enumerate() {
            _mm512_storeu_ps(ap.add(r * PANEL), *s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_abs_diff;

    /// Every kernel this machine can run.
    fn kernels() -> Vec<(&'static str, F32Kernel)> {
        let k: Vec<_> = F32Kernel::supported()
            .into_iter()
            .map(|k| (k.name(), k))
            .collect();
        eprintln!(
            "f32 kernels run here: {:?}",
            k.iter().map(|k| k.0).collect::<Vec<_>>()
        );
        k
    }

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

    fn product_tensor(p: &PackedWeight, x: &Tensor, bias: Option<&[f32]>, k: F32Kernel) -> Tensor {
        let rows = x.dim(0).unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        Tensor::from_vec(
            p.product(&xs, rows, bias, k, None),
            (rows, p.outputs()),
            &Device::Cpu,
        )
        .unwrap()
    }

    /// Every kernel against candle's `x Wᵀ + b`, for output counts that are and are not whole
    /// panels, row counts below, at and across the tile size, and a transposed weight view.
    #[test]
    fn matches_candle_matmul() {
        let dev = Device::Cpu;
        for (outputs, inputs) in [(48, 40), (37, 24), (5, 7)] {
            let w = Tensor::randn(0f32, 1.0, (outputs, inputs), &dev).unwrap();
            let b = Tensor::randn(0f32, 1.0, outputs, &dev).unwrap();
            let bias = b.to_vec1::<f32>().unwrap();
            let transposed = w.t().unwrap().contiguous().unwrap().t().unwrap();
            for weight in [&w, &transposed] {
                let packed = PackedWeight::pack(weight).unwrap();
                assert_eq!(max_abs_diff(&packed.unpack(), &w), 0.0);
                for rows in [1, 5, 6, 7, 13, 14, 15, 29, 80] {
                    let x = Tensor::randn(0f32, 1.0, (rows, inputs), &dev).unwrap();
                    let want = x.matmul(&w.t().unwrap()).unwrap();
                    let want_b = want.broadcast_add(&b).unwrap();
                    for (name, k) in kernels() {
                        let got = product_tensor(&packed, &x, None, k);
                        assert!(max_rel_diff(&got, &want) < 1e-5, "{name} rows {rows}");
                        let got = product_tensor(&packed, &x, Some(&bias), k);
                        assert!(
                            max_rel_diff(&got, &want_b) < 1e-5,
                            "{name} rows {rows} bias"
                        );
                    }
                    let got = packed.linear(&x, Some(&bias)).unwrap();
                    assert_eq!(got.dims(), &[rows, outputs]);
                    assert!(max_rel_diff(&got, &want_b) < 1e-5);
                    let host = packed.linear_to_host(&x, Some(&bias)).unwrap();
                    assert_eq!(host, got.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                    // An epilogue sees every output once, after the bias.
                    let then = packed
                        .linear_then(
                            &x,
                            Some(&bias),
                            Some(|v: &mut [f32]| v.iter_mut().for_each(|v| *v = *v * 2.0 + 1.0)),
                        )
                        .unwrap();
                    let want_then = ((got * 2.0).unwrap() + 1.0).unwrap();
                    assert_eq!(max_abs_diff(&then, &want_then), 0.0);
                }
            }
        }
    }

    /// The vectorised kernels fuse the same multiply-adds in the same order: AVX2 and AVX-512
    /// give the same bits, for every tile size of each (and across several depth blocks).
    #[test]
    fn fused_kernels_agree_bit_for_bit() {
        let dev = Device::Cpu;
        let fused: Vec<F32Kernel> = F32Kernel::supported()
            .into_iter()
            .filter(|k| *k != F32Kernel::Portable)
            .collect();
        eprintln!("fused kernels run here: {fused:?}");
        let (outputs, inputs) = (40, DEPTH + 37);
        let w = Tensor::randn(0f32, 1.0, (outputs, inputs), &dev).unwrap();
        let packed = PackedWeight::pack(&w).unwrap();
        let bias: Vec<f32> = (0..outputs).map(|i| i as f32 * 0.1).collect();
        for rows in (1..=2 * AVX512_TILE_ROWS + 1).chain([80]) {
            let x = Tensor::randn(0f32, 1.0, (rows, inputs), &dev).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let results: Vec<Vec<f32>> = fused
                .iter()
                .map(|&k| packed.product(&xs, rows, Some(&bias), k, None))
                .collect();
            for (k, r) in fused.iter().zip(&results).skip(1) {
                assert_eq!(r, &results[0], "{k:?} vs {:?}, {rows} rows", fused[0]);
            }
        }
    }

    #[test]
    fn kernel_choice() {
        let best = F32Kernel::choose(None).unwrap();
        assert_eq!(Some(&best), F32Kernel::supported().last());
        for &k in F32Kernel::ALL {
            match F32Kernel::choose(Some(k.name())) {
                Ok(chosen) => assert!(k.is_supported() && chosen == k),
                Err(e) => {
                    assert!(!k.is_supported());
                    assert!(e.to_string().contains("cannot run it"), "{e}");
                }
            }
        }
        let e = F32Kernel::choose(Some("sse")).unwrap_err().to_string();
        assert!(
            e.contains("unknown f32 kernel") && e.contains("avx512"),
            "{e}"
        );
        if std::env::var(KERNEL_ENV).map_or(true, |v| v.trim().is_empty()) {
            assert_eq!(F32Kernel::selected().unwrap(), best);
        }
    }

    #[test]
    fn tiles_cover_the_rows_evenly() {
        for max in [TILE_ROWS, AVX512_TILE_ROWS] {
            for rows in 1usize..200 {
                let tiles = rows.div_ceil(max);
                let mut next = 0;
                for t in 0..tiles {
                    let (first, count) = tile_span(rows, tiles, t);
                    assert_eq!(first, next);
                    assert!((1..=max).contains(&count) && count + 1 >= rows / tiles);
                    next += count;
                }
                assert_eq!(next, rows);
            }
        }
        assert_eq!(tile_span(80, 14, 0), (0, 6));
        assert_eq!(tile_span(80, 14, 13), (75, 5));
    }

    /// Panel views compute their own outputs; a lookup reads rows exactly.
    #[test]
    fn views_and_row_lookups() {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (3 * PANEL + 3, 8), &dev).unwrap();
        let packed = PackedWeight::pack(&w).unwrap();
        let x = Tensor::randn(0f32, 1.0, (9, 8), &dev).unwrap();
        let full = packed.linear(&x, None).unwrap();
        for (from, len) in [(0, PANEL), (PANEL, 2 * PANEL), (2 * PANEL, PANEL + 3)] {
            let view = packed.narrow_outputs(from, len).unwrap();
            assert_eq!(view.outputs(), len);
            let got = view.linear(&x, None).unwrap();
            assert_eq!(max_abs_diff(&got, &full.narrow(1, from, len).unwrap()), 0.0);
            assert_eq!(
                max_abs_diff(&view.unpack(), &w.narrow(0, from, len).unwrap()),
                0.0
            );
        }
        assert!(packed.narrow_outputs(3, PANEL).is_err());
        assert!(packed.narrow_outputs(0, PANEL + 1).is_err());
        assert!(packed.narrow_outputs(PANEL, 3 * PANEL).is_err());
        let ids = Tensor::new(&[[50u32, 0], [17, 50]], &dev).unwrap();
        let got = packed.select_rows(&ids).unwrap();
        let want = w.index_select(&ids.flatten_all().unwrap(), 0).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0);
        let err = packed
            .select_rows(&Tensor::new(&[51u32], &dev).unwrap())
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("index 51 out of range for 51 rows"),
            "{err}"
        );
    }

    #[test]
    fn mismatches_are_errors() {
        let dev = Device::Cpu;
        let packed = PackedWeight::pack(&Tensor::ones((5, 8), DType::F32, &dev).unwrap()).unwrap();
        let x = Tensor::zeros((3, 7), DType::F32, &dev).unwrap();
        assert!(packed.linear(&x, None).is_err());
        let x = Tensor::zeros((3, 8), DType::F32, &dev).unwrap();
        assert!(packed.linear(&x, Some(&[0.0; 4])).is_err());
        let y = packed.linear(&x, Some(&[1.0; 5])).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![1.0; 5]; 3]);
        let empty = Tensor::zeros((0, 8), DType::F32, &dev).unwrap();
        assert_eq!(packed.linear(&empty, None).unwrap().dims(), &[0, 5]);
        let half = Tensor::zeros((5, 8), DType::BF16, &dev).unwrap();
        assert!(PackedWeight::pack(&half).is_err());
    }
}
