//! A BART whose weights are trainable variables: from a pretrained folder, or initialised from
//! scratch the way transformers' `_init_weights` does (seeded, so runs are reproducible).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::config::BartConfig;
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::model::{Bart, Pass};

/// Tensors transformers keeps as buffers, not parameters: never updated by the optimizer.
pub const BUFFERS: [&str; 1] = ["final_logits_bias"];

/// The model and its variables.
pub struct Trainable {
    /// Variables by transformers name (f32 master weights).
    pub varmap: VarMap,
    /// The network, reading those variables.
    pub model: Bart,
    /// With mixed precision: a lower-precision copy of the weights that the forward and backward
    /// passes use; the optimizer keeps updating the f32 master weights above.
    compute: Option<ComputeCopy>,
}

/// Half-precision working copy of the weights for mixed-precision training.
struct ComputeCopy {
    varmap: VarMap,
    model: Bart,
    dtype: DType,
}

impl Trainable {
    /// Creates the variables for `config` on `device`, initialised from `tensors` (all expected
    /// tensors must be present, e.g. from [`crate::weights::load_checked`]).
    pub fn from_tensors(
        config: &BartConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let t = Self::allocate(config, device)?;
        {
            let data = t.varmap.data().lock().expect("varmap lock");
            for (name, var) in data.iter() {
                let value = tensors
                    .get(name)
                    .ok_or_else(|| Error::Weights(format!("initial weights lack tensor {name}")))?;
                var.set(&value.to_dtype(DType::F32)?.to_device(device)?)?;
            }
        }
        Ok(t)
    }

    /// Creates randomly initialised variables as transformers' `BartPretrainedModel._init_weights`
    /// does: linear and embedding weights ~ N(0, init_std), biases 0, the padding row of the token
    /// embedding 0, layer norms 1 and 0, `final_logits_bias` 0.
    pub fn from_scratch(config: &BartConfig, seed: u64, device: &Device) -> Result<Self> {
        let t = Self::allocate(config, device)?;
        let normal = Normal::new(0.0f32, config.init_std as f32)
            .map_err(|e| Error::Invalid(format!("init_std: {e}")))?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let data = t.varmap.data().lock().expect("varmap lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        for name in names {
            let var = &data[name];
            let shape = var.as_tensor().shape().clone();
            let is_norm = name.contains("layer_norm") || name.contains("layernorm");
            let value = if BUFFERS.contains(&name.as_str()) || name.ends_with(".bias") {
                Tensor::zeros(&shape, DType::F32, device)?
            } else if is_norm {
                Tensor::ones(&shape, DType::F32, device)?
            } else {
                let mut v: Vec<f32> = (0..shape.elem_count())
                    .map(|_| normal.sample(&mut rng))
                    .collect();
                if name == "model.shared.weight" {
                    if let Some(pad) = config.pad_token_id {
                        let d = config.d_model;
                        v[pad as usize * d..(pad as usize + 1) * d].fill(0.0);
                    }
                }
                Tensor::from_vec(v, &shape, device)?
            };
            var.set(&value)?;
        }
        drop(data);
        Ok(t)
    }

    fn allocate(config: &BartConfig, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let model = Bart::load(config, vb)?;
        Ok(Self {
            varmap,
            model,
            compute: None,
        })
    }

    /// Trains in mixed precision: forward and backward passes run on a `dtype` (bf16 or f16)
    /// copy of the weights, gradients come back as f32 and the optimizer updates the f32 master
    /// weights (PyTorch's `autocast` recipe; layer norm, softmax and the loss stay in f32).
    /// `DType::F32` returns to plain f32 training.
    pub fn set_compute_dtype(&mut self, config: &BartConfig, dtype: DType) -> Result<()> {
        if dtype == DType::F32 {
            self.compute = None;
            return Ok(());
        }
        let device = self.device()?;
        let varmap = VarMap::new();
        let model = Bart::load(config, VarBuilder::from_varmap(&varmap, dtype, &device))?;
        self.compute = Some(ComputeCopy {
            varmap,
            model,
            dtype,
        });
        self.sync_compute_copy()
    }

    /// The dtype the forward and backward passes run in.
    pub fn compute_dtype(&self) -> DType {
        self.compute.as_ref().map(|c| c.dtype).unwrap_or(DType::F32)
    }

    /// Refreshes the mixed-precision copy from the master weights; call after every update of
    /// the master weights (a no-op in f32).
    pub fn sync_compute_copy(&self) -> Result<()> {
        let Some(c) = &self.compute else {
            return Ok(());
        };
        let master = self.varmap.data().lock().expect("varmap lock");
        let copy = c.varmap.data().lock().expect("varmap lock");
        for (name, var) in copy.iter() {
            let m = master
                .get(name)
                .ok_or_else(|| Error::Weights(format!("no master weight for {name}")))?;
            var.set(&m.as_tensor().to_dtype(c.dtype)?)?;
        }
        Ok(())
    }

    fn device(&self) -> Result<Device> {
        let data = self.varmap.data().lock().expect("varmap lock");
        Ok(data
            .values()
            .next()
            .map(|v| v.as_tensor().device().clone())
            .unwrap_or(Device::Cpu))
    }

    /// The network that forward passes use (the mixed-precision copy when there is one).
    fn network(&self) -> &Bart {
        self.compute
            .as_ref()
            .map(|c| &c.model)
            .unwrap_or(&self.model)
    }

    /// Trainable variables (everything but buffers), sorted by name.
    pub fn parameters(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().expect("varmap lock");
        let mut out: Vec<(String, Var)> = data
            .iter()
            .filter(|(n, _)| !BUFFERS.contains(&n.as_str()))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// All current values (parameters and buffers) by name.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let data = self.varmap.data().lock().expect("varmap lock");
        data.iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect()
    }

    /// Mean cross-entropy over the batch's label tokens (padding ignored), as transformers'
    /// `BartForConditionalGeneration(labels=…)` computes it.
    pub fn loss(&self, batch: &Batch, pass: Pass<'_>) -> Result<Tensor> {
        let logits = self.network().forward(
            &batch.input_ids,
            Some(&batch.attention_mask),
            &batch.decoder_input_ids,
            Some(&batch.decoder_attention_mask),
            pass,
        )?;
        masked_cross_entropy(&logits, &batch.labels, &batch.decoder_attention_mask)
    }

    /// Sum of token losses and the number of label tokens (for exact validation means).
    pub fn loss_sum(&self, batch: &Batch) -> Result<(f64, usize)> {
        let mean = self.loss(batch, Pass::Inference)?.to_scalar::<f32>()? as f64;
        Ok((mean * batch.label_tokens as f64, batch.label_tokens))
    }

    /// Backpropagates `loss` and returns the gradient of every trainable variable by name (f32,
    /// also in mixed precision).
    pub fn gradients(&self, loss: &Tensor) -> Result<HashMap<String, Tensor>> {
        let store = loss.backward()?;
        let mut out = HashMap::new();
        let vars = match &self.compute {
            None => self.parameters(),
            Some(c) => {
                let data = c.varmap.data().lock().expect("varmap lock");
                data.iter()
                    .filter(|(n, _)| !BUFFERS.contains(&n.as_str()))
                    .map(|(n, v)| (n.clone(), v.clone()))
                    .collect()
            }
        };
        for (name, var) in vars {
            if let Some(g) = store.get(var.as_tensor()) {
                // Detached: a gradient computed from the graph otherwise keeps that whole step's
                // graph (activations included) alive for as long as anything derived from it —
                // an optimizer moment, say — lives, i.e. forever.
                out.insert(name, g.to_dtype(DType::F32)?.detach());
            }
        }
        Ok(out)
    }
}

/// Mean negative log-likelihood of `labels` under `logits` `(b, t, vocab)` over positions where
/// `mask` `(b, t)` is non-zero.
pub fn masked_cross_entropy(logits: &Tensor, labels: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?.reshape((b * t, v))?, 1)?;
    let picked = logp
        .gather(&labels.reshape((b * t, 1))?.to_dtype(DType::U32)?, 1)?
        .reshape(b * t)?;
    let mask = mask.reshape(b * t)?.to_dtype(DType::F32)?;
    let count = mask.sum_all()?.to_scalar::<f32>()?;
    if count == 0.0 {
        return Err(Error::Invalid("batch has no label tokens".into()));
    }
    Ok(((picked * mask)?.sum_all()?.neg()? / count as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Encoded;

    fn tiny() -> BartConfig {
        BartConfig::from_json_str(
            r#"{"vocab_size": 40, "d_model": 16, "encoder_layers": 1, "decoder_layers": 1,
                "encoder_attention_heads": 2, "decoder_attention_heads": 2,
                "encoder_ffn_dim": 32, "decoder_ffn_dim": 32, "max_position_embeddings": 32,
                "pad_token_id": 3, "eos_token_id": 1, "bos_token_id": 0,
                "decoder_start_token_id": 1, "dropout": 0.0}"#,
            std::path::Path::new("tiny.json"),
        )
        .unwrap()
    }

    /// Gradients must not hold the step's graph: anything derived from them (optimizer
    /// moments) would otherwise keep every step's activations alive — on a GPU that ran out of
    /// memory after a few hundred steps.
    #[test]
    fn gradients_are_detached_from_the_graph() {
        for dtype in [DType::F32, DType::BF16] {
            let cfg = tiny();
            let mut t = Trainable::from_scratch(&cfg, 1, &Device::Cpu).unwrap();
            t.set_compute_dtype(&cfg, dtype).unwrap();
            let e = Encoded {
                input_ids: vec![5, 6, 7, 1],
                decoder_input_ids: vec![1, 8, 9],
                labels: vec![8, 9, 1],
            };
            let batch = Batch::build(&[&e], 3, &Device::Cpu).unwrap();
            let loss = t.loss(&batch, Pass::Training { dropout: None }).unwrap();
            let grads = t.gradients(&loss).unwrap();
            assert_eq!(grads.len(), t.parameters().len());
            for (name, g) in &grads {
                assert_eq!(g.dtype(), DType::F32, "{name}");
                // Backpropagating from a detached tensor reaches no variable.
                let store = (g.sum_all().unwrap() * 2.0).unwrap().backward().unwrap();
                for (_, var) in t.parameters() {
                    assert!(store.get(var.as_tensor()).is_none(), "{name} is attached");
                }
            }
        }
    }
}
