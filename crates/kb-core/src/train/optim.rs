//! AdamW with the original recipe's parameter groups, the linear warmup/decay schedule, and
//! gradient clipping by global norm — each computing what PyTorch computes
//! (`torch.optim.AdamW`, `transformers.get_linear_schedule_with_warmup`,
//! `torch.nn.utils.clip_grad_norm_`).

use std::collections::HashMap;

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::error::Result;

/// Substrings that exempt a parameter from weight decay: the original's
/// `no_decay = ['bias', 'LayerNorm.bias', 'LayerNorm.weight']`, matched by substring as it did.
/// (For BART's names this exempts every bias; its layer norms are named `…layer_norm.weight` and
/// `layernorm_embedding.weight`, which that list does not match, so their weights are decayed —
/// exactly as in the original.)
pub const NO_DECAY: [&str; 3] = ["bias", "LayerNorm.bias", "LayerNorm.weight"];

/// Whether the original recipe applied weight decay to the parameter `name`.
pub fn decays(name: &str) -> bool {
    !NO_DECAY.iter().any(|nd| name.contains(nd))
}

/// AdamW hyper-parameters (PyTorch defaults besides `lr` and `weight_decay`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Decoupled weight decay for parameters that decay.
    pub weight_decay: f64,
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 3e-5,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

/// One trained parameter and its moments.
#[derive(Debug)]
pub struct ParamState {
    /// Name (transformers' naming).
    pub name: String,
    /// The variable.
    pub var: Var,
    /// First moment.
    pub exp_avg: Tensor,
    /// Second moment.
    pub exp_avg_sq: Tensor,
    /// Whether weight decay applies.
    pub decay: bool,
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    /// Settings.
    pub config: AdamWConfig,
    /// Parameters in a fixed (sorted by name) order.
    pub params: Vec<ParamState>,
    /// Optimizer steps taken.
    pub step: usize,
}

impl AdamW {
    /// Creates the optimizer over `vars` (sorted by name for a stable order).
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let mut vars = vars;
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                // Two distinct buffers: the CPU update writes them in place.
                Ok(ParamState {
                    decay: decays(&name),
                    exp_avg: var.as_tensor().zeros_like()?,
                    exp_avg_sq: var.as_tensor().zeros_like()?,
                    name,
                    var,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            params,
            step: 0,
        })
    }

    /// Applies one update with learning rate `lr` given each parameter's gradient (by name;
    /// parameters without a gradient are left alone, as PyTorch does).
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// [`AdamW::step`] with every gradient multiplied by `grad_scale` as it is read — the
    /// coefficient of [`clip_coefficient`], applied without rewriting the gradients.
    ///
    /// On the CPU each parameter is updated in place in three passes over its memory (first
    /// moment, second moment, parameter) with no temporaries; elsewhere with tensor ops. Both
    /// compute what `torch.optim.AdamW` (single-tensor implementation) computes.
    pub fn step_scaled(
        &mut self,
        grads: &HashMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2 = 1.0 - c.beta2.powi(t);
        let step_size = lr / bias_correction1;
        let bc2_sqrt = bias_correction2.sqrt();
        let scale = (grad_scale != 1.0).then_some(grad_scale as f32);
        for p in &mut self.params {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let decay = (p.decay && c.weight_decay != 0.0).then_some(1.0 - lr * c.weight_decay);
            let theta = p.var.as_tensor();
            if theta.device().is_cpu() {
                let g = g.to_dtype(DType::F32)?.contiguous()?;
                p.exp_avg.inplace_op2(
                    &g,
                    &FirstMoment {
                        weight: (1.0 - c.beta1) as f32,
                        scale,
                    },
                )?;
                p.exp_avg_sq.inplace_op2(
                    &g,
                    &SecondMoment {
                        beta2: c.beta2 as f32,
                        weight: (1.0 - c.beta2) as f32,
                        scale,
                    },
                )?;
                theta.inplace_op3(
                    &p.exp_avg,
                    &p.exp_avg_sq,
                    &ParameterUpdate {
                        decay: decay.map(|d| d as f32),
                        step_size: step_size as f32,
                        bc2_sqrt: bc2_sqrt as f32,
                        eps: c.eps as f32,
                    },
                )?;
                continue;
            }
            let mut g = g.to_dtype(DType::F32)?;
            if let Some(s) = scale {
                g = (g * s as f64)?;
            }
            let mut theta = theta.clone();
            if let Some(d) = decay {
                theta = (theta * d)?;
            }
            // exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
            let g = g.detach();
            p.exp_avg = (&p.exp_avg + ((&g - &p.exp_avg)? * (1.0 - c.beta1))?)?.detach();
            p.exp_avg_sq = ((&p.exp_avg_sq * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?.detach();
            let denom = ((p.exp_avg_sq.sqrt()? / bc2_sqrt)? + c.eps)?;
            let theta = (theta - (p.exp_avg.div(&denom)? * step_size)?)?;
            p.var.set(&theta)?;
        }
        Ok(())
    }
}

/// Elements per parallel work item of the in-place updates.
const CHUNK: usize = 1 << 15;

fn slice_of<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("AdamW: {what} is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[start..end]),
        _ => candle_core::bail!("AdamW: {what} is not f32"),
    }
}

fn slice_of_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("AdamW: {what} is not contiguous")))?;
    match s {
        CpuStorage::F32(v) => Ok(&mut v[start..end]),
        _ => candle_core::bail!("AdamW: {what} is not f32"),
    }
}

fn same_len(a: usize, b: usize) -> candle_core::Result<()> {
    if a != b {
        candle_core::bail!("AdamW: state of {a} elements, gradient of {b}");
    }
    Ok(())
}

/// `m ← m + w·(g − m)` (`lerp_` with weight `1 − β1`), in place.
struct FirstMoment {
    weight: f32,
    scale: Option<f32>,
}

impl InplaceOp2 for FirstMoment {
    fn name(&self) -> &'static str {
        "adamw-first-moment"
    }

    fn cpu_fwd(
        &self,
        m: &mut CpuStorage,
        lm: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<()> {
        let m = slice_of_mut(m, lm, "exp_avg")?;
        let g = slice_of(g, lg, "gradient")?;
        same_len(m.len(), g.len())?;
        let (w, scale) = (self.weight, self.scale);
        m.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = scale.map_or(g, |s| g * s);
                    *m += w * (g - *m);
                }
            });
        Ok(())
    }
}

/// `v ← v·β2 + ((1 − β2)·g)·g` (`mul_` then `addcmul_`), in place.
struct SecondMoment {
    beta2: f32,
    weight: f32,
    scale: Option<f32>,
}

impl InplaceOp2 for SecondMoment {
    fn name(&self) -> &'static str {
        "adamw-second-moment"
    }

    fn cpu_fwd(
        &self,
        v: &mut CpuStorage,
        lv: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<()> {
        let v = slice_of_mut(v, lv, "exp_avg_sq")?;
        let g = slice_of(g, lg, "gradient")?;
        same_len(v.len(), g.len())?;
        let (b2, w, scale) = (self.beta2, self.weight, self.scale);
        v.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .for_each(|(v, g)| {
                for (v, &g) in v.iter_mut().zip(g) {
                    let g = scale.map_or(g, |s| g * s);
                    *v = *v * b2 + w * g * g;
                }
            });
        Ok(())
    }
}

/// `θ ← θ·(1 − lr·wd) − step_size · m / (√v / √bc2 + ε)` (`mul_` then `addcdiv_`), in place.
struct ParameterUpdate {
    decay: Option<f32>,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

impl InplaceOp3 for ParameterUpdate {
    fn name(&self) -> &'static str {
        "adamw-parameter-update"
    }

    fn cpu_fwd(
        &self,
        theta: &mut CpuStorage,
        lt: &Layout,
        m: &CpuStorage,
        lm: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<()> {
        let theta = slice_of_mut(theta, lt, "parameter")?;
        let m = slice_of(m, lm, "exp_avg")?;
        let v = slice_of(v, lv, "exp_avg_sq")?;
        same_len(theta.len(), m.len())?;
        same_len(theta.len(), v.len())?;
        let (decay, step, bc2, eps) = (self.decay, self.step_size, self.bc2_sqrt, self.eps);
        theta
            .par_chunks_mut(CHUNK)
            .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
            .for_each(|(t, (m, v))| {
                for ((t, &m), &v) in t.iter_mut().zip(m).zip(v) {
                    let decayed = decay.map_or(*t, |d| *t * d);
                    *t = decayed + -step * (m / (v.sqrt() / bc2 + eps));
                }
            });
        Ok(())
    }
}

/// transformers' `get_linear_schedule_with_warmup`: the multiplier of the peak learning rate
/// for optimizer step `step` (0-based): `step / warmup` during warmup, then linear decay to 0.
pub fn linear_warmup_decay(step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return step as f64 / warmup.max(1) as f64;
    }
    let remaining = total.saturating_sub(step) as f64;
    let span = total.saturating_sub(warmup).max(1) as f64;
    (remaining / span).max(0.0)
}

/// Warmup steps for a warmup ratio, as the original computed them (`int(total * ratio)`).
pub fn warmup_steps(total: usize, ratio: f64) -> usize {
    (total as f64 * ratio) as usize
}

/// Global L2 norm of all gradients (`clip_grad_norm_`'s `total_norm`).
pub fn global_norm(grads: &HashMap<String, Tensor>) -> Result<f64> {
    let mut sum = 0f64;
    // Off the CPU, per-tensor sums stay on the device and are read back once (one
    // synchronisation per step instead of one per parameter).
    let mut on_device: Option<Tensor> = None;
    for g in grads.values() {
        let g = g.to_dtype(DType::F32)?;
        if g.device().is_cpu() {
            sum += sum_of_squares(&g)?;
        } else {
            let s = g.sqr()?.sum_all()?;
            on_device = Some(match on_device {
                None => s,
                Some(acc) => (acc + s)?,
            });
        }
    }
    if let Some(t) = on_device {
        sum += t.to_scalar::<f32>()? as f64;
    }
    Ok(sum.sqrt())
}

/// Σ x² of an f32 tensor: read in place on the CPU (f32 within blocks, f64 across them),
/// with tensor ops elsewhere.
fn sum_of_squares(t: &Tensor) -> Result<f64> {
    if t.device().is_cpu() && t.is_contiguous() {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(v[a..b]
                .par_chunks(CHUNK)
                .map(|c| c.iter().map(|x| x * x).sum::<f32>() as f64)
                .sum());
        }
    }
    Ok(t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64)
}

/// The factor `clip_grad_norm_` multiplies gradients by to bring their global norm to at most
/// `max_norm` (`max_norm / (norm + 1e-6)` when that is below 1, else 1), and the norm.
pub fn clip_coefficient(grads: &HashMap<String, Tensor>, max_norm: f64) -> Result<(f64, f64)> {
    let norm = global_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    Ok((if coef < 1.0 { coef } else { 1.0 }, norm))
}

/// Scales gradients so their global norm is at most `max_norm`, exactly as
/// `torch.nn.utils.clip_grad_norm_` does (`coef = max_norm / (norm + 1e-6)`, applied when < 1).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut HashMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_decay_matches_the_original_substring_rule() {
        assert!(!decays("model.encoder.layers.0.fc1.bias"));
        assert!(!decays("model.encoder.layernorm_embedding.bias"));
        assert!(decays("model.encoder.layers.0.fc1.weight"));
        assert!(decays("model.encoder.layers.0.self_attn_layer_norm.weight"));
        assert!(!decays("bert.LayerNorm.weight"));
    }

    #[test]
    fn schedule_matches_transformers() {
        // warmup 2 of 10: 0, .5, 1, then (10-s)/8
        let got: Vec<f64> = (0..11).map(|s| linear_warmup_decay(s, 2, 10)).collect();
        let want = [
            0.0,
            0.5,
            1.0,
            7.0 / 8.0,
            6.0 / 8.0,
            5.0 / 8.0,
            0.5,
            3.0 / 8.0,
            0.25,
            1.0 / 8.0,
            0.0,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?}");
        }
        assert_eq!(linear_warmup_decay(0, 0, 10), 1.0);
        assert_eq!(warmup_steps(553, 0.1), 55);
    }
}
