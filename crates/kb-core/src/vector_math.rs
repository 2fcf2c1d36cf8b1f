//! Vectorisable f32 kernels of the CPU inference path: exponential and error function without
//! library calls, log-softmax, GELU and residual-add + layer norm over contiguous rows.
//!
//! Each kernel is a plain-Rust body (fixed-width lanes, branch-free element code) compiled twice:
//! once for the baseline target and once with AVX2 + FMA, chosen at run time — the same
//! binary runs on any x86-64 CPU and uses 8-wide vectors where the CPU has them. The library
//! functions they replace (`expf`, `erff`) cannot be vectorised, and candle's element-wise ops
//! hand every small tensor to a thread pool, whose synchronisation costs more than the work at
//! a decoding step's sizes.
//!
//! Accuracy (unit tests against f64): [`exp`] within 2 ulp of e^x for x ≤ 88 (0 below
//! e^-87.3, where it would be subnormal); [`erf`] within 5e-7 absolute, so GELU within 1.3e-6
//! absolute (largest in its negative tail, where `0.5·x·(1 + erf)` scales erf's error by |x|/2)
//! — PyTorch's own f32 GELU is up to 1.2e-6 from the exact value.

/// Lanes of the accumulations (sums and maxima are kept in this many independent partial
/// results so the compiler can keep them in one vector register).
const LANES: usize = 8;

/// Whether the CPU runs AVX2 and FMA (checked once).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Defines `$vis fn $name(args)` running `$body(args)` compiled with AVX2 + FMA when the CPU has
/// them, and as compiled for the baseline target otherwise.
macro_rules! dispatched {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $body:ident;) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if $crate::vector_math::has_avx2_fma() {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? {
                    $body($($arg),*)
                }
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                return unsafe { wide($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}

pub(crate) use dispatched;

/// e^x in f32 (Cody–Waite range reduction, degree-6 polynomial, exponent by bit assembly),
/// branch-free so that loops over it vectorise. NaN gives NaN; x below -87.33 gives 0 and x
/// above 88.3 gives +inf (e^88.3 ≈ 2.2e38 is still finite: callers here only pass x ≤ 0).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOW: f32 = -87.336_54; // e^LOW is the smallest normal f32
    const HIGH: f32 = 88.3;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LOW, HIGH);
    let n = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n for n in -126..=127: a normal float with that exponent.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let v = y * scale;
    let v = if x > HIGH { f32::INFINITY } else { v };
    let v = if x < LOW { 0.0 } else { v };
    if x.is_nan() {
        x
    } else {
        v
    }
}

/// erf(x) in f32 as a rational function of x on (-4, 4), exactly ±1 outside (1 - erf(4) is
/// below f32 precision), branch-free: within 5e-7 of the exact value.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let outside = 1f32.copysign(x);
    let big = x.abs() >= 4.0;
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142e-10;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 - 2.101_024e-6;
    p = p * x2 - 5.692_506_4e-5;
    p = p * x2 - 7.349_906_3e-4;
    p = p * x2 - 2.954_6e-3;
    p = p * x2 - 1.609_603_3e-2;
    let mut q = -1.456_607_2e-5;
    q = q * x2 - 2.133_740_6e-4;
    q = q * x2 - 1.682_827e-3;
    q = q * x2 - 7.373_329e-3;
    q = q * x2 - 1.426_474e-2;
    let v = x * p / q;
    if big {
        outside
    } else {
        v
    }
}

/// GELU with the exact (erf) form, `x · (1 + erf(x / √2)) / 2`, as BART's `gelu`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
fn gelu_body(values: &mut [f32]) {
    for v in values.iter_mut() {
        *v = gelu(*v);
    }
}

dispatched! {
    /// Applies [`gelu`] to every value in place.
    pub fn gelu_in_place(values: &mut [f32]) = gelu_body;
}

/// The largest value (NaN ignored; -inf for an empty or all-NaN slice).
#[inline(always)]
fn max_of(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            lanes[l] = lanes[l].max(c[l]);
        }
    }
    rest.iter()
        .chain(&lanes)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `Σ e^(v - shift)` over `values`.
#[inline(always)]
fn sum_exp(values: &[f32], shift: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let chunks = values.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            lanes[l] += exp(c[l] - shift);
        }
    }
    rest.iter().map(|&v| exp(v - shift)).sum::<f32>() + lanes.iter().sum::<f32>()
}

#[inline(always)]
fn log_softmax_body(row: &mut [f32]) {
    let max = max_of(row);
    let log_sum = sum_exp(row, max).ln();
    for v in row.iter_mut() {
        *v = *v - max - log_sum;
    }
}

dispatched! {
    /// In-place log-softmax of one row in f32 (`x - max - ln Σ e^(x - max)`), as transformers'
    /// `log_softmax` on float32 logits up to the order of the additions.
    pub fn log_softmax_in_place(row: &mut [f32]) = log_softmax_body;
}

/// In-place softmax of one row (the body of [`softmax_in_place`], for kernels that are
/// themselves dispatched).
#[inline(always)]
pub(crate) fn softmax_body(row: &mut [f32]) {
    let max = max_of(row);
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            c[l] = exp(c[l] - max);
            lanes[l] += c[l];
        }
    }
    let mut total: f32 = lanes.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp(*v - max);
        total += *v;
    }
    let inv = 1.0 / total;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

dispatched! {
    /// In-place softmax of one row in f32.
    pub fn softmax_in_place(row: &mut [f32]) = softmax_body;
}

/// `Σ a[i]·b[i]` in eight partial sums.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// `out += a · x`.
#[inline(always)]
pub fn axpy(out: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// `f32::from_bits(b << 16)`: a bf16 widened to f32 (exact), branch-free.
#[inline(always)]
fn bf16_to_f32_body(src: &[half::bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

dispatched! {
    /// Widens `src` into `dst` (the same length), exactly.
    pub fn bf16_to_f32_slice(src: &[half::bf16], dst: &mut [f32]) = bf16_to_f32_body;
}

/// f32 to bf16 rounded to nearest, ties to even (as `half::bf16::from_f32`: NaN stays a quiet
/// NaN, values past the largest bf16 become ±∞), branch-free.
#[inline(always)]
fn f32_to_bf16_body(src: &[f32], dst: &mut [half::bf16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        let x = s.to_bits();
        let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
        let quiet_nan = ((x >> 16) as u16) | 0x40;
        let is_nan = x & 0x7fff_ffff > 0x7f80_0000;
        *d = half::bf16::from_bits(if is_nan { quiet_nan } else { rounded });
    }
}

dispatched! {
    /// Rounds `src` into `dst` (the same length) as bf16.
    pub fn f32_to_bf16_slice(src: &[f32], dst: &mut [half::bf16]) = f32_to_bf16_body;
}

/// Widens `src` into `dst` (the same length), exactly: F16C's `vcvtph2ps`, eight values at a
/// time, where the CPU has it (the `half` crate checks at run time), else its software path.
pub fn f16_to_f32_slice(src: &[half::f16], dst: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(dst);
}

/// Rounds `src` into `dst` (the same length) as f16, to nearest, ties to even: F16C's
/// `vcvtps2ph`, eight values at a time, where the CPU has it, else `half`'s software path.
pub fn f32_to_f16_slice(src: &[f32], dst: &mut [half::f16]) {
    use half::slice::HalfFloatSliceExt;
    dst.convert_from_f32_slice(src);
}

/// Layer-norm parameters of one normalised dimension.
#[derive(Debug, Clone, Copy)]
pub struct NormParams<'a> {
    /// Scale (`dim` values).
    pub weight: &'a [f32],
    /// Shift (`dim` values).
    pub bias: &'a [f32],
    /// Added to the variance.
    pub eps: f32,
}

#[inline(always)]
fn add_layer_norm_body(x: &[f32], h: &[f32], norm: NormParams<'_>, out: &mut [f32]) {
    let dim = norm.weight.len();
    for ((x, h), out) in x
        .chunks_exact(dim)
        .zip(h.chunks_exact(dim))
        .zip(out.chunks_exact_mut(dim))
    {
        let mut lanes = [0f32; LANES];
        let mut rest = 0f32;
        {
            let mut o = out.chunks_exact_mut(LANES);
            let (mut xc, mut hc) = (x.chunks_exact(LANES), h.chunks_exact(LANES));
            for ((o, x), h) in (&mut o).zip(&mut xc).zip(&mut hc) {
                for l in 0..LANES {
                    o[l] = x[l] + h[l];
                    lanes[l] += o[l];
                }
            }
            for ((o, x), h) in o
                .into_remainder()
                .iter_mut()
                .zip(xc.remainder())
                .zip(hc.remainder())
            {
                *o = x + h;
                rest += *o;
            }
        }
        let mean = (lanes.iter().sum::<f32>() + rest) / dim as f32;
        let mut lanes = [0f32; LANES];
        let chunks = out.chunks_exact(LANES);
        let rest: f32 = chunks
            .remainder()
            .iter()
            .map(|v| (v - mean) * (v - mean))
            .sum();
        for c in chunks {
            for l in 0..LANES {
                let d = c[l] - mean;
                lanes[l] += d * d;
            }
        }
        let var = (lanes.iter().sum::<f32>() + rest) / dim as f32;
        let inv_std = 1.0 / (var + norm.eps).sqrt();
        for ((o, w), b) in out.iter_mut().zip(norm.weight).zip(norm.bias) {
            *o = (*o - mean) * inv_std * w + b;
        }
    }
}

dispatched! {
    /// `out = LayerNorm(x + h)` over rows of `norm.weight.len()` values (biased variance, as
    /// `torch.nn.LayerNorm`; mean and variance in two passes). `x`, `h` and `out` hold the same
    /// whole number of rows.
    pub fn add_layer_norm_rows(x: &[f32], h: &[f32], norm: NormParams<'_>, out: &mut [f32]) = add_layer_norm_body;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units of the last place between two finite floats of the same sign.
    fn ulp_diff(a: f32, b: f32) -> u32 {
        if a == b {
            return 0;
        }
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0;
        let mut x = -87.3f32;
        while x < 88.0 {
            let want = (x as f64).exp() as f32;
            worst = worst.max(ulp_diff(exp(x), want));
            x += 0.000_731;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erf_and_gelu_match_the_exact_functions() {
        let mut worst_erf = 0f64;
        let mut worst_gelu = 0f64;
        let mut x = -8.0f32;
        while x < 8.0 {
            let exact = libm::erf(x as f64);
            worst_erf = worst_erf.max((erf(x) as f64 - exact).abs());
            let g = x as f64 * 0.5 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2));
            worst_gelu = worst_gelu.max((gelu(x) as f64 - g).abs());
            x += 0.000_37;
        }
        assert!(worst_erf < 5e-7, "erf off by {worst_erf}");
        assert!(worst_gelu < 1.3e-6, "gelu off by {worst_gelu}");
        assert_eq!(erf(0.0), 0.0);
        assert!(gelu(f32::NAN).is_nan());
        let mut v = vec![-3.0f32, -0.5, 0.0, 0.25, 2.0, 7.5, -1.0, 1.0, 0.1];
        let want: Vec<f32> = v.iter().map(|&x| gelu(x)).collect();
        let mut baseline = v.clone();
        gelu_body(&mut baseline);
        gelu_in_place(&mut v);
        assert_eq!(v, want);
        assert_eq!(baseline, want);
    }

    #[test]
    fn softmaxes_match_f64() {
        let row: Vec<f32> = (0..1003)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let max = row
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, |m, v| m.max(v as f64));
        let total: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        let mut log = row.clone();
        log_softmax_in_place(&mut log);
        let mut soft = row.clone();
        softmax_in_place(&mut soft);
        // The baseline bodies (what a CPU without AVX2 runs) agree with the dispatched ones.
        let mut baseline = row.clone();
        log_softmax_body(&mut baseline);
        assert!(baseline.iter().zip(&log).all(|(a, b)| (a - b).abs() < 1e-6));
        let mut baseline = row.clone();
        softmax_body(&mut baseline);
        assert!(baseline
            .iter()
            .zip(&soft)
            .all(|(a, b)| (a - b).abs() < 1e-9));
        for ((&v, &l), &s) in row.iter().zip(&log).zip(&soft) {
            let want = v as f64 - max - total.ln();
            assert!((l as f64 - want).abs() < 2e-6, "{l} vs {want}");
            assert!((s as f64 - want.exp()).abs() < 1e-6 * want.exp());
        }
        // -inf scores (banned tokens) stay -inf / 0.
        let mut row = vec![1.0, f32::NEG_INFINITY, 0.5];
        log_softmax_in_place(&mut row);
        assert_eq!(row[1], f32::NEG_INFINITY);
        let mut row = vec![1.0, f32::MIN, 0.5];
        softmax_in_place(&mut row);
        assert_eq!(row[1], 0.0);
    }

    #[test]
    fn dot_and_axpy() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32 * 0.25).collect();
        let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - want).abs() < 1e-4);
        let mut out = b.clone();
        axpy(&mut out, 2.0, &a);
        for ((o, x), y) in out.iter().zip(&a).zip(&b) {
            assert_eq!(*o, y + 2.0 * x);
        }
    }

    #[test]
    fn add_layer_norm_matches_f64() {
        let dim = 37;
        let rows = 3;
        let x: Vec<f32> = (0..rows * dim)
            .map(|i| (i % 13) as f32 * 0.3 - 1.0)
            .collect();
        let h: Vec<f32> = (0..rows * dim)
            .map(|i| (i % 7) as f32 * -0.2 + 0.4)
            .collect();
        let weight: Vec<f32> = (0..dim).map(|i| 1.0 + i as f32 * 0.01).collect();
        let bias: Vec<f32> = (0..dim).map(|i| i as f32 * -0.02).collect();
        let norm = NormParams {
            weight: &weight,
            bias: &bias,
            eps: 1e-5,
        };
        let mut out = vec![0f32; rows * dim];
        add_layer_norm_rows(&x, &h, norm, &mut out);
        let mut baseline = vec![0f32; rows * dim];
        add_layer_norm_body(&x, &h, norm, &mut baseline);
        assert!(baseline.iter().zip(&out).all(|(a, b)| (a - b).abs() < 1e-6));
        for r in 0..rows {
            let s: Vec<f64> = (0..dim)
                .map(|i| x[r * dim + i] as f64 + h[r * dim + i] as f64)
                .collect();
            let mean = s.iter().sum::<f64>() / dim as f64;
            let var = s.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / dim as f64;
            for i in 0..dim {
                let want = (s[i] - mean) / (var + 1e-5).sqrt() * weight[i] as f64 + bias[i] as f64;
                assert!((out[r * dim + i] as f64 - want).abs() < 2e-6);
            }
        }
    }

    #[test]
    fn half_conversions_match_half() {
        let mut v: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.0173).collect();
        v.extend([
            0.0,
            -0.0,
            f32::MAX,
            -f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xffff_ffff),
            f32::from_bits(0x3f80_8000), // a tie, to even (down)
            f32::from_bits(0x3f81_8000), // a tie, to even (up)
            1e-40,
        ]);
        let mut b = vec![half::bf16::ZERO; v.len()];
        f32_to_bf16_slice(&v, &mut b);
        let mut baseline = vec![half::bf16::ZERO; v.len()];
        f32_to_bf16_body(&v, &mut baseline);
        let mut h = vec![half::f16::ZERO; v.len()];
        f32_to_f16_slice(&v, &mut h);
        for (i, &x) in v.iter().enumerate() {
            let want = half::bf16::from_f32(x);
            assert_eq!(
                b[i].to_bits(),
                want.to_bits(),
                "bf16 of {x} ({:#x})",
                x.to_bits()
            );
            assert_eq!(baseline[i].to_bits(), want.to_bits());
            let want = half::f16::from_f32(x);
            assert!(
                h[i].to_bits() == want.to_bits() || (h[i].is_nan() && want.is_nan()),
                "f16 of {x}"
            );
        }
        let mut wide = vec![0f32; v.len()];
        bf16_to_f32_slice(&b, &mut wide);
        for (w, b) in wide.iter().zip(&b) {
            assert!(w.to_bits() == b.to_f32().to_bits() || (w.is_nan() && b.is_nan()));
        }
        f16_to_f32_slice(&h, &mut wide);
        for (w, h) in wide.iter().zip(&h) {
            assert!(w.to_bits() == h.to_f32().to_bits() || (w.is_nan() && h.is_nan()));
        }
    }
}
