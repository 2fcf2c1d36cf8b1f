//! What the f32 packed products ([`super::packed`]) and the int8 ones ([`super::quantized`])
//! share: checking the operands, splitting the output into panels of [`PANEL`] outputs computed
//! in parallel and written once (no zero-filling pass), splitting the rows into tiles, and
//! choosing a tile kernel once per process, with an environment variable to force one.

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::Tensor;
use rayon::prelude::*;

use super::packed::{Epilogue, PANEL};

/// A family of product kernels chosen at run time: the fastest this CPU runs, unless an
/// environment variable names one.
pub trait KernelFamily: Copy + Eq + Send + Sync + 'static {
    /// Every kernel, slowest first.
    const ALL: &'static [Self];
    /// The environment variable that forces a kernel.
    const ENV: &'static str;
    /// What the kernels multiply, for messages (`f32`, `int8`).
    const WHAT: &'static str;

    /// The kernel's name, as [`KernelFamily::ENV`] spells it.
    fn name(self) -> &'static str;

    /// The CPU features the kernel needs, for messages.
    fn needs(self) -> &'static str;

    /// Whether this CPU runs the kernel (checked at run time).
    fn is_supported(self) -> bool;

    /// The kernels this CPU runs, slowest first.
    fn supported() -> Vec<Self> {
        Self::ALL
            .iter()
            .copied()
            .filter(|k| k.is_supported())
            .collect()
    }

    /// The kernel named `request` (an error if unknown or not supported by this CPU), or the
    /// fastest this CPU runs when `None` or empty.
    fn choose(request: Option<&str>) -> crate::Result<Self> {
        let request = request.map(str::trim).filter(|r| !r.is_empty());
        let Some(name) = request else {
            return Ok(*Self::supported()
                .last()
                .expect("the portable kernel runs anywhere"));
        };
        let names = || Self::ALL.iter().map(|k| k.name()).collect::<Vec<_>>();
        let Some(kernel) = Self::ALL.iter().copied().find(|k| k.name() == name) else {
            return Err(crate::Error::Invalid(format!(
                "{}={name}: unknown {} kernel (expected one of {})",
                Self::ENV,
                Self::WHAT,
                names().join(", ")
            )));
        };
        if !kernel.is_supported() {
            let here: Vec<&str> = Self::supported().into_iter().map(Self::name).collect();
            return Err(crate::Error::Invalid(format!(
                "{}={name}: this CPU cannot run it (it needs {}; this CPU runs: {})",
                Self::ENV,
                kernel.needs(),
                here.join(", ")
            )));
        }
        Ok(kernel)
    }
}

/// The kernel the products use: the one `K::ENV` names, else the fastest this CPU runs, decided
/// once per process in `cell` (an error every time if the variable names a kernel that is
/// unknown or that this CPU lacks).
pub fn selected_kernel<K: KernelFamily>(
    cell: &'static OnceLock<Result<K, String>>,
) -> candle_core::Result<K> {
    cell.get_or_init(|| {
        let request = std::env::var(K::ENV).ok();
        K::choose(request.as_deref()).map_err(|e| e.to_string())
    })
    .clone()
    .map_err(candle_core::Error::msg)
}

/// Checks the operands of `x Wᵀ (+ bias)` for a `(outputs, inputs)` weight; `what` names the
/// product in errors. Returns `x`'s rows.
pub fn check_operands(
    what: &str,
    x: &Tensor,
    outputs: usize,
    inputs: usize,
    bias: Option<&[f32]>,
) -> candle_core::Result<usize> {
    let (rows, x_inputs) = x.dims2()?;
    if x_inputs != inputs {
        candle_core::bail!(
            "{what}: input {:?} does not match weight ({outputs}, {inputs})",
            x.dims()
        );
    }
    if let Some(b) = bias {
        if b.len() != outputs {
            candle_core::bail!("{what}: {} bias values for {outputs} outputs", b.len());
        }
    }
    Ok(rows)
}

/// Rows `(first, count)` of tile `t` when `rows` rows are split into `tiles` tiles of at most a
/// kernel's rows: sizes differ by at most one (80 rows in tiles of 6: ten tiles of 6 and four of
/// 5, rather than thirteen of 6 and one of 2, whose 4 accumulators cannot hide the FMA latency).
pub fn tile_span(rows: usize, tiles: usize, t: usize) -> (usize, usize) {
    let (base, extra) = (rows / tiles, rows % tiles);
    (t * base + t.min(extra), base + usize::from(t < extra))
}

/// A `rows × outputs` row-major product computed panel by panel: the panels in a few chunks per
/// thread (every core busy, no synchronisation inside), each chunk with its own `state` (the
/// kernel's accumulators). `compute_panel` computes one panel for every row and hands its
/// results, tile after tile in row order, to [`PanelOutput::write`].
pub fn product_by_panels<S>(
    rows: usize,
    outputs: usize,
    epilogue: Option<Epilogue>,
    new_state: impl Fn() -> S + Sync,
    compute_panel: impl Fn(&mut S, &PanelOutput) + Sync,
) -> Vec<f32> {
    if rows == 0 || outputs == 0 {
        return vec![0f32; rows * outputs];
    }
    let mut y = Vec::<f32>::with_capacity(rows * outputs);
    let panel_count = outputs.div_ceil(PANEL);
    let chunk = panel_count
        .div_ceil(2 * rayon::current_num_threads())
        .max(1);
    let out = OutPtr(y.as_mut_ptr());
    (0..panel_count.div_ceil(chunk))
        .into_par_iter()
        .for_each(|c| {
            let mut state = new_state();
            for panel in c * chunk..((c + 1) * chunk).min(panel_count) {
                let output = PanelOutput {
                    out,
                    rows,
                    outputs,
                    panel,
                    width: PANEL.min(outputs - panel * PANEL),
                    epilogue,
                    next_row: Cell::new(0),
                };
                compute_panel(&mut state, &output);
                assert_eq!(
                    output.next_row.get(),
                    rows,
                    "a panel product must write every row of its panel"
                );
            }
        });
    // SAFETY: the panels cover outputs `0..outputs`, and for each panel `PanelOutput::write`
    // was checked (above and in it) to have written rows `0..rows` in order, so all
    // `rows × outputs` values are initialised.
    unsafe { y.set_len(rows * outputs) };
    y
}

/// Where one panel's results go (see [`product_by_panels`]).
pub struct PanelOutput {
    out: OutPtr,
    rows: usize,
    outputs: usize,
    panel: usize,
    width: usize,
    epilogue: Option<Epilogue>,
    /// The first row not written yet: tiles must come in row order.
    next_row: Cell<usize>,
}

impl PanelOutput {
    /// The panel's index (its outputs start at `panel · PANEL`).
    pub fn panel(&self) -> usize {
        self.panel
    }

    /// The panel's outputs: [`PANEL`], or fewer for the last panel.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Applies the epilogue to `result` (the panel's results for the next `result.len() / PANEL`
    /// rows, [`PANEL`] values per row, past `width` ignored) and writes them. Panics if rows
    /// would be written out of order or past the end.
    pub fn write(&self, result: &mut [f32]) {
        assert!(result.len().is_multiple_of(PANEL));
        let (r0, count) = (self.next_row.get(), result.len() / PANEL);
        assert!(r0 + count <= self.rows, "panel rows past the product's end");
        if let Some(epilogue) = self.epilogue {
            epilogue(result);
        }
        let column = self.panel * PANEL;
        for (r, src) in result.chunks_exact(PANEL).enumerate() {
            let dst = self.out.add((r0 + r) * self.outputs + column);
            // SAFETY: the output has room for `rows × outputs` values and outlives the product
            // (see `product_by_panels`); row `r0 + r < rows` (checked above) and outputs
            // `column ..+ width ≤ outputs` lie inside it, and only this panel's task writes
            // them. A whole panel is copied as one fixed-size block (two vector moves, not a
            // `memcpy` call per row and panel).
            unsafe {
                if self.width == PANEL {
                    dst.cast::<[f32; PANEL]>()
                        .write_unaligned(src.try_into().expect("a panel row"));
                } else {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), dst, self.width);
                }
            }
        }
        self.next_row.set(r0 + count);
    }
}

/// A raw output pointer shared by tasks that write disjoint parts of the output.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: each task writes only the outputs of its own panels (see `product_by_panels`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer `offset` elements further (taking `self` whole, so that closures capture
    /// the `Send` wrapper rather than its raw field).
    fn add(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panels_are_written_where_they_belong() {
        // Output (r, o) = r·1000 + o, written in tiles of 3 rows, with a partial last panel.
        let (rows, outputs) = (7, 2 * PANEL + 5);
        let y = product_by_panels(
            rows,
            outputs,
            None,
            || (),
            |_, out| {
                let mut r = 0;
                while r < rows {
                    let n = 3.min(rows - r);
                    let mut tile = vec![0f32; n * PANEL];
                    for (i, row) in tile.chunks_exact_mut(PANEL).enumerate() {
                        for (j, v) in row.iter_mut().enumerate().take(out.width()) {
                            *v = ((r + i) * 1000 + out.panel() * PANEL + j) as f32;
                        }
                    }
                    out.write(&mut tile);
                    r += n;
                }
            },
        );
        for r in 0..rows {
            for o in 0..outputs {
                assert_eq!(y[r * outputs + o], (r * 1000 + o) as f32);
            }
        }
    }

    #[test]
    #[should_panic(expected = "every row")]
    fn a_panel_left_short_is_refused() {
        product_by_panels(
            4,
            PANEL,
            None,
            || (),
            |_, out| out.write(&mut [0f32; PANEL]),
        );
    }
}
