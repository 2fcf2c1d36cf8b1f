//! AdamW with the original recipe's parameter groups, the linear warmup/decay schedule, and
//! gradient clipping by global norm — each computing what PyTorch computes
//! (`torch.optim.AdamW`, `transformers.get_linear_schedule_with_warmup`,
//! `torch.nn.utils.clip_grad_norm_`).

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

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
                let zeros = var.as_tensor().zeros_like()?;
                Ok(ParamState {
                    decay: decays(&name),
                    name,
                    var,
                    exp_avg: zeros.clone(),
                    exp_avg_sq: zeros,
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
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let bias_correction1 = 1.0 - c.beta1.powi(t);
        let bias_correction2 = 1.0 - c.beta2.powi(t);
        let step_size = lr / bias_correction1;
        let bc2_sqrt = bias_correction2.sqrt();
        for p in &mut self.params {
            let Some(g) = grads.get(&p.name) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            let mut theta = p.var.as_tensor().clone();
            if p.decay && c.weight_decay != 0.0 {
                theta = (theta * (1.0 - lr * c.weight_decay))?;
            }
            // exp_avg.lerp_(grad, 1 - beta1); exp_avg_sq.mul_(beta2).addcmul_(grad, grad, 1 - beta2)
            p.exp_avg = (&p.exp_avg + ((&g - &p.exp_avg)? * (1.0 - c.beta1))?)?;
            p.exp_avg_sq = ((&p.exp_avg_sq * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((p.exp_avg_sq.sqrt()? / bc2_sqrt)? + c.eps)?;
            let theta = (theta - (p.exp_avg.div(&denom)? * step_size)?)?;
            p.var.set(&theta)?;
        }
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
    for g in grads.values() {
        sum += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(sum.sqrt())
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
