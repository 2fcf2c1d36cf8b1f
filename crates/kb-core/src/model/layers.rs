//! Building blocks of the BART model: linear and norm layers, activations, masks and attention.
//!
//! Each op has a fused inference path and a differentiable path (chosen by [`Pass`]): candle's
//! fused layer-norm and softmax kernels have no backward pass, so training uses composed ops.

use std::cell::Cell;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};

use super::options::Quantization;
use super::packed::{self, with_f32_slices, PackedWeight};
use super::quantized::QuantizedWeight;
use crate::config::Activation;

/// Layer-norm epsilon used by every BART layer norm (PyTorch's default).
pub const LAYER_NORM_EPS: f64 = 1e-5;

/// Loads a linear layer (`weight` of shape `(out, in)` and `bias`).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Linear> {
    // Every weight is then set from a checkpoint or by `Trainable::from_scratch`: no random init.
    let weight = vb.get_with_hints((out_dim, in_dim), "weight", candle_nn::Init::Const(0.0))?;
    let bias = vb.get_with_hints(out_dim, "bias", candle_nn::Init::Const(0.0))?;
    Ok(Linear::Dense { weight, bias })
}

/// `y = x Wᵀ + b` with `W` of shape `(out, in)`, as `torch.nn.Linear`.
#[derive(Debug, Clone)]
pub enum Linear {
    /// As loaded: trainable, or weights the packed kernel does not cover (not f32 on the CPU).
    Dense {
        /// `(out, in)`.
        weight: Tensor,
        /// `out` values.
        bias: Tensor,
    },
    /// Frozen f32 weights on the CPU in the kernel's layout (see [`Linear::prepare_inference`]).
    Packed {
        /// `W`, packed.
        weight: PackedWeight,
        /// The bias as host values.
        bias: Arc<[f32]>,
    },
    /// Frozen weights on the CPU quantized to int8 (see [`Linear::prepare_inference`]).
    Quantized {
        /// `W`, quantized.
        weight: QuantizedWeight,
        /// The bias as host values.
        bias: Arc<[f32]>,
    },
}

impl Linear {
    /// For inference with frozen weights on the CPU: the weight is replaced by its packed f32
    /// form ([`PackedWeight`], for f32 weights) or, with [`Quantization::Int8`], by its int8 form
    /// ([`QuantizedWeight`], from f32, f16 or bf16 weights); no second copy is kept, and every
    /// later product uses it. Trainable weights, weights on other devices, and (without
    /// quantization) non-f32 weights are left alone.
    pub fn prepare_inference(&mut self, quantization: Quantization) -> candle_core::Result<()> {
        let Linear::Dense { weight, bias } = self else {
            return Ok(());
        };
        if weight.is_variable() || !weight.device().is_cpu() {
            return Ok(());
        }
        let host_bias = || -> candle_core::Result<Arc<[f32]>> {
            Ok(bias.to_dtype(DType::F32)?.to_vec1::<f32>()?.into())
        };
        *self = match quantization {
            Quantization::Int8 => Linear::Quantized {
                weight: QuantizedWeight::quantize(weight)?,
                bias: host_bias()?,
            },
            Quantization::None => {
                let Some(weight) = PackedWeight::pack_frozen(weight)? else {
                    return Ok(());
                };
                Linear::Packed {
                    weight,
                    bias: host_bias()?,
                }
            }
        };
        Ok(())
    }

    /// Whether the weight is in a CPU kernel's layout (packed f32 or int8): a view of whole
    /// panels can be taken ([`Linear::narrow_outputs`]).
    fn is_prepared(&self) -> bool {
        matches!(self, Linear::Packed { .. } | Linear::Quantized { .. })
    }

    /// Bytes of the weight matrix as stored (views report the matrix they view, whole).
    pub fn weight_bytes(&self) -> usize {
        match self {
            Linear::Dense { weight, .. } => weight.elem_count() * weight.dtype().size_in_bytes(),
            Linear::Packed { weight, .. } => weight.bytes(),
            Linear::Quantized { weight, .. } => weight.bytes(),
        }
    }

    /// Output features `[from, from + len)` as a layer of their own (a view: no copy of the
    /// weight).
    fn narrow_outputs(&self, from: usize, len: usize) -> candle_core::Result<Linear> {
        Ok(match self {
            Linear::Dense { weight, bias } => Linear::Dense {
                weight: weight.narrow(0, from, len)?,
                bias: bias.narrow(0, from, len)?,
            },
            Linear::Packed { weight, bias } => Linear::Packed {
                weight: weight.narrow_outputs(from, len)?,
                bias: bias[from..from + len].into(),
            },
            Linear::Quantized { weight, bias } => Linear::Quantized {
                weight: weight.narrow_outputs(from, len)?,
                bias: bias[from..from + len].into(),
            },
        })
    }

    /// `act(x Wᵀ + b)`. With packed or quantized weights the GELU of BART's feed-forward layers
    /// runs inside the product, on each block of outputs while it is in cache
    /// ([`crate::vector_math::gelu`]); otherwise the activation follows the product.
    pub fn forward_activated(&self, x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
        let gelu: packed::Epilogue = crate::vector_math::gelu_in_place;
        match (self, act) {
            (Linear::Packed { weight, bias }, Activation::Gelu) => {
                on_rows(x, |x| weight.linear_then(x, Some(bias), Some(gelu)))
            }
            (Linear::Quantized { weight, bias }, Activation::Gelu) => {
                on_f32_rows(x, |x| weight.linear_then(x, Some(bias), Some(gelu)))
            }
            _ => activate(&self.forward(x)?, act),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Linear::Quantized { weight, bias } => on_f32_rows(x, |x| weight.linear(x, Some(bias))),
            Linear::Packed { weight, bias } => on_rows(x, |x| weight.linear(x, Some(bias))),
            Linear::Dense { weight, bias } => {
                on_rows(x, |x| matmul_weight_t(x, weight)?.broadcast_add(bias))
            }
        }
    }
}

/// [`on_rows`] for a map that takes and gives f32 (the int8 products): inputs of another dtype
/// (a model run in f16 or bf16) are converted to f32 and the outputs back.
fn on_f32_rows(
    x: &Tensor,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    on_rows(x, |x| f(&x.to_dtype(DType::F32)?)?.to_dtype(dtype))
}

/// Applies `f`, a map from `(rows, features)` to `(rows, outputs)`, along the last dimension of
/// `x` whatever its leading dimensions.
fn on_rows(
    x: &Tensor,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let (rows, features) = match x.dims() {
        [.., n] => (x.elem_count() / n, *n),
        [] => candle_core::bail!("linear layer applied to a scalar"),
    };
    let y = f(&x.reshape((rows, features))?)?;
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("at least one dim") = y.dim(1)?;
    y.reshape(out_dims)
}

/// Rows of `x` up to which [`matmul_weight_t`] computes `(W xᵀ)ᵀ` for frozen weights too.
pub const WEIGHT_FIRST_MAX_ROWS: usize = 32;

/// `x Wᵀ` for a 2-D `x`, computed as `(W xᵀ)ᵀ` — the same product with the weight as the left
/// operand — when `W` is a trainable variable or `x` has few rows:
///
/// - training: candle's backward pass then produces `W`'s gradient directly in `W`'s layout,
///   instead of as a transposed copy that must be added back element by element with strides
///   (a full pass over every weight matrix per step); the transposes move to the activations,
///   which are far smaller than the weights at fine-tuning batch sizes;
/// - decoding steps with few rows (one query's beams, a small greedy batch): candle's CPU
///   matrix multiply runs this form 1.2–2.5× faster alone at BART's shapes for 5–16 rows; at 80
///   rows the product alone is still faster but a whole decoding step is ~5% slower (the
///   transposed result makes the following bias add and norms strided), and at 240+ rows it is
///   equal or slower, so it is used up to [`WEIGHT_FIRST_MAX_ROWS`] rows. (Frozen f32 weights
///   on the CPU do not come here at all: they are packed, see [`Linear::prepare_inference`];
///   this matters for f16/bf16 inference on the CPU.)
pub fn matmul_weight_t(x: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let few_rows = x.dim(0)? <= WEIGHT_FIRST_MAX_ROWS && matches!(x.device(), Device::Cpu);
    if weight.is_variable() || few_rows {
        weight.matmul(&x.t()?)?.t()
    } else {
        x.matmul(&weight.t()?)
    }
}

/// A LayerNorm with weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of size `dim`.
    pub fn load(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?;
        Ok(Self { weight, bias })
    }

    /// Normalises the last dimension.
    pub fn forward(&self, x: &Tensor, pass: Pass<'_>) -> candle_core::Result<Tensor> {
        if pass.differentiable() || !x.is_contiguous() {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, LAYER_NORM_EPS as f32)
        } else {
            candle_nn::ops::layer_norm(x, &self.weight, &self.bias, LAYER_NORM_EPS as f32)
        }
    }

    /// `LayerNorm(x + h)`: the residual connection and the norm after it (post-LN BART). At
    /// inference on contiguous f32 CPU tensors, one pass over each row
    /// ([`crate::vector_math::add_layer_norm_rows`]) instead of an element-wise add and a norm.
    pub fn forward_residual(
        &self,
        x: &Tensor,
        h: &Tensor,
        pass: Pass<'_>,
    ) -> candle_core::Result<Tensor> {
        let fused = !pass.differentiable()
            && x.shape() == h.shape()
            && [x, h, &self.weight, &self.bias]
                .iter()
                .all(|t| t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous());
        if !fused {
            return self.forward(&(x + h)?, pass);
        }
        let dim = self.weight.elem_count();
        let rows = x.elem_count() / dim.max(1);
        let mut out = vec![0f32; rows * dim];
        with_f32_slices([x, h, &self.weight, &self.bias], |[x, h, weight, bias]| {
            let norm = crate::vector_math::NormParams {
                weight,
                bias,
                eps: LAYER_NORM_EPS as f32,
            };
            // Blocks of rows: one block per thread only when there is enough work.
            let block = dim * rows.div_ceil(rayon::current_num_threads()).max(64);
            use rayon::prelude::*;
            out.par_chunks_mut(block)
                .zip(x.par_chunks(block).zip(h.par_chunks(block)))
                .for_each(|(out, (x, h))| crate::vector_math::add_layer_norm_rows(x, h, norm, out));
        })?;
        Tensor::from_vec(out, x.shape(), x.device())
    }
}

/// Applies an activation function.
pub fn activate(x: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    match act {
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluNew => x.gelu(),
        Activation::Relu => x.relu(),
        Activation::Silu => x.silu(),
        Activation::Tanh => x.tanh(),
    }
}

/// How a forward pass runs.
#[derive(Debug, Clone, Copy)]
pub enum Pass<'a> {
    /// Fused kernels, no dropout, no gradients needed.
    Inference,
    /// Differentiable ops; dropout when a random source is given.
    Training {
        /// Dropout masks come from here; `None` disables dropout (e.g. golden-step checks).
        dropout: Option<&'a DropoutRng>,
    },
}

impl Pass<'_> {
    /// Whether ops must support backpropagation.
    pub fn differentiable(&self) -> bool {
        matches!(self, Pass::Training { .. })
    }
}

/// A seeded source of dropout masks.
///
/// Mask `i` of a pass is drawn from a ChaCha8 stream seeded with `(seed, i)`, so a training step
/// with the same seed draws the same masks on every run — which is what makes `--resume` replay
/// an interrupted run exactly (candle's CPU random generator cannot be seeded).
#[derive(Debug)]
pub struct DropoutRng {
    seed: u64,
    counter: Cell<u64>,
}

impl DropoutRng {
    /// A source for one forward pass, seeded by e.g. the run seed and the global step.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            counter: Cell::new(0),
        }
    }

    fn mask(
        &self,
        shape: &[usize],
        p: f64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let i = self.counter.get();
        self.counter.set(i + 1);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03),
        );
        let n: usize = shape.iter().product();
        let keep = (1.0 / (1.0 - p)) as f32;
        let threshold = (p * u32::MAX as f64) as u32;
        let values: Vec<f32> = (0..n)
            .map(|_| {
                if rng.random::<u32>() >= threshold {
                    keep
                } else {
                    0.0
                }
            })
            .collect();
        Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
    }
}

/// Dropout with probability `p`, active only in a training pass with a random source.
pub fn dropout(x: &Tensor, p: f64, pass: Pass<'_>) -> candle_core::Result<Tensor> {
    match pass {
        Pass::Training { dropout: Some(rng) } if p > 0.0 => {
            let mask = rng.mask(x.dims(), p, x.dtype(), x.device())?;
            x * mask
        }
        _ => Ok(x.clone()),
    }
}

/// Softmax over the last dimension.
pub fn softmax_last(x: &Tensor, pass: Pass<'_>) -> candle_core::Result<Tensor> {
    if pass.differentiable() && matches!(x.dtype(), DType::BF16 | DType::F16) {
        // Mixed-precision training computes softmax in f32, as PyTorch's autocast does.
        candle_nn::ops::softmax(&x.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(x.dtype())
    } else if pass.differentiable() || !x.is_contiguous() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// The most negative finite value of `dtype`, used to mask attention scores
/// (transformers uses `torch.finfo(dtype).min`).
pub fn mask_value(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => half::f16::MIN.to_f64(),
        DType::BF16 => half::bf16::MIN.to_f64(),
        DType::F64 => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// Turns a `(batch, keys)` 0/1 padding mask (any dtype) into an additive mask of shape
/// `(batch, 1, 1, keys)`: 0 where attended, the dtype's minimum where masked.
pub fn additive_padding_mask(mask: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?.ne(0f32)?; // u8
    let zeros = Tensor::zeros((b, s), dtype, mask.device())?;
    let neg = Tensor::full(mask_value(dtype), (b, s), mask.device())?.to_dtype(dtype)?;
    keep.where_cond(&zeros, &neg)?.reshape((b, 1, 1, s))
}

/// Additive causal mask of shape `(batch, 1, tgt, past + tgt)` for decoder self-attention,
/// combined with an optional `(batch, past + tgt)` 0/1 padding mask of the decoder keys.
pub fn additive_causal_mask(
    batch: usize,
    tgt: usize,
    past: usize,
    padding: Option<&Tensor>,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let keys = past + tgt;
    let mut keep = vec![0u8; batch * tgt * keys];
    let pad: Option<Vec<Vec<f32>>> = match padding {
        Some(p) => Some(p.to_dtype(DType::F32)?.to_vec2()?),
        None => None,
    };
    for b in 0..batch {
        for i in 0..tgt {
            for j in 0..=(past + i) {
                let visible = pad.as_ref().map(|p| p[b][j] != 0.0).unwrap_or(true);
                keep[(b * tgt + i) * keys + j] = visible as u8;
            }
        }
    }
    let keep = Tensor::from_vec(keep, (batch, 1, tgt, keys), device)?;
    let zeros = Tensor::zeros((batch, 1, tgt, keys), dtype, device)?;
    let neg = Tensor::full(mask_value(dtype), (batch, 1, tgt, keys), device)?.to_dtype(dtype)?;
    keep.where_cond(&zeros, &neg)
}

/// Keys and values of one attention layer, shaped `(batch, heads, keys, head_dim)`.
#[derive(Debug, Clone)]
pub struct KeyValues {
    /// Keys.
    pub keys: Tensor,
    /// Values.
    pub values: Tensor,
}

impl KeyValues {
    /// Number of key positions.
    pub fn len(&self) -> usize {
        self.keys.dim(2).unwrap_or(0)
    }

    /// Whether there are no key positions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Selects rows of the batch (beam reordering).
    pub fn select_rows(&self, rows: &Tensor) -> candle_core::Result<KeyValues> {
        Ok(KeyValues {
            keys: self.keys.index_select(rows, 0)?,
            values: self.values.index_select(rows, 0)?,
        })
    }

    /// The keys and values in `dtype` (shared, not copied, when they already are).
    pub fn to_dtype(&self, dtype: DType) -> candle_core::Result<KeyValues> {
        Ok(KeyValues {
            keys: self.keys.to_dtype(dtype)?,
            values: self.values.to_dtype(dtype)?,
        })
    }

    /// The dtype keys and values are stored in.
    pub fn dtype(&self) -> DType {
        self.keys.dtype()
    }
}

/// Multi-head attention as in transformers' `BartAttention`.
#[derive(Debug, Clone)]
pub struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    /// The q, k and v projections stacked into one `(3·dim, dim)` product, for inference (see
    /// [`Attention::fuse_projections`]).
    qkv: Option<Linear>,
    heads: usize,
    head_dim: usize,
    scaling: f64,
    dropout: f64,
}

impl Attention {
    /// Loads `q_proj`, `k_proj`, `v_proj`, `out_proj` under `vb`.
    pub fn load(
        dim: usize,
        heads: usize,
        dropout: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        let head_dim = dim / heads;
        Ok(Self {
            q_proj: linear(dim, dim, vb.pp("q_proj"))?,
            k_proj: linear(dim, dim, vb.pp("k_proj"))?,
            v_proj: linear(dim, dim, vb.pp("v_proj"))?,
            out_proj: linear(dim, dim, vb.pp("out_proj"))?,
            qkv: None,
            heads,
            head_dim,
            scaling: (head_dim as f64).powf(-0.5),
            dropout,
        })
    }

    fn split_heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, self.heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Projects `x` `(batch, len, dim)` to keys and values.
    pub fn key_values(&self, x: &Tensor) -> candle_core::Result<KeyValues> {
        Ok(KeyValues {
            keys: self.split_heads(&self.k_proj.forward(x)?)?,
            values: self.split_heads(&self.v_proj.forward(x)?)?,
        })
    }

    /// For inference: stacks the q, k and v weights into one `(3·dim, dim)` matrix so that
    /// self-attention projects with one matrix product instead of three (fewer, larger
    /// products: faster on the CPU); the separate projections become views of it, so no memory
    /// is added. Trainable weights are left alone.
    pub fn fuse_projections(&mut self) -> candle_core::Result<()> {
        let (
            Linear::Dense {
                weight: q,
                bias: qb,
            },
            Linear::Dense {
                weight: k,
                bias: kb,
            },
            Linear::Dense {
                weight: v,
                bias: vb,
            },
        ) = (&self.q_proj, &self.k_proj, &self.v_proj)
        else {
            return Ok(());
        };
        if self.qkv.is_some() || q.is_variable() {
            return Ok(());
        }
        let dim = q.dim(0)?;
        let qkv = Linear::Dense {
            weight: Tensor::cat(&[q, k, v], 0)?,
            bias: Tensor::cat(&[qb, kb, vb], 0)?,
        };
        self.q_proj = qkv.narrow_outputs(0, dim)?;
        self.k_proj = qkv.narrow_outputs(dim, dim)?;
        self.v_proj = qkv.narrow_outputs(2 * dim, dim)?;
        self.qkv = Some(qkv);
        Ok(())
    }

    /// Prepares every projection for inference on the CPU ([`Linear::prepare_inference`]).
    /// Stacked q/k/v projections are packed (or quantized) once and the separate ones become
    /// views of it; when the width is not a whole number of panels (views need whole panels),
    /// the stack is given up and q, k and v are prepared separately.
    pub fn prepare_inference(&mut self, quantization: Quantization) -> candle_core::Result<()> {
        let dim = self.heads * self.head_dim;
        if !dim.is_multiple_of(packed::PANEL) {
            self.qkv = None;
        }
        if let Some(qkv) = &mut self.qkv {
            qkv.prepare_inference(quantization)?;
            if qkv.is_prepared() {
                self.q_proj = qkv.narrow_outputs(0, dim)?;
                self.k_proj = qkv.narrow_outputs(dim, dim)?;
                self.v_proj = qkv.narrow_outputs(2 * dim, dim)?;
            }
        } else {
            for proj in [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj] {
                proj.prepare_inference(quantization)?;
            }
        }
        self.out_proj.prepare_inference(quantization)
    }

    /// Bytes of the projection weights as stored (a stacked q/k/v matrix counted once).
    pub fn weight_bytes(&self) -> usize {
        let qkv = match &self.qkv {
            Some(qkv) => qkv.weight_bytes(),
            None => [&self.q_proj, &self.k_proj, &self.v_proj]
                .iter()
                .map(|p| p.weight_bytes())
                .sum(),
        };
        qkv + self.out_proj.weight_bytes()
    }

    /// Scaled queries `(batch, len, dim)` and the keys/values of `x` `(batch, len, dim)`
    /// attending to itself (one product when the projections are fused).
    pub fn self_projections(&self, x: &Tensor) -> candle_core::Result<(Tensor, KeyValues)> {
        let Some(qkv) = &self.qkv else {
            let q = (self.q_proj.forward(x)? * self.scaling)?;
            return Ok((q, self.key_values(x)?));
        };
        let dim = x.dim(2)?;
        let y = qkv.forward(x)?;
        let q = (y.narrow(2, 0, dim)? * self.scaling)?;
        let kv = KeyValues {
            keys: self.split_heads(&y.narrow(2, dim, dim)?)?,
            values: self.split_heads(&y.narrow(2, 2 * dim, dim)?)?,
        };
        Ok((q, kv))
    }

    /// Attends from `x` `(batch, tgt, dim)` to `kv`, with an optional additive mask
    /// broadcastable to `(batch, heads, tgt, keys)`.
    pub fn attend(
        &self,
        x: &Tensor,
        kv: &KeyValues,
        mask: Option<&Tensor>,
        pass: Pass<'_>,
    ) -> candle_core::Result<Tensor> {
        let q = (self.q_proj.forward(x)? * self.scaling)?;
        self.attend_query(&q, kv, mask, pass)
    }

    /// [`Attention::attend`] from already projected and scaled queries `q` `(batch, tgt, dim)`.
    pub fn attend_query(
        &self,
        q: &Tensor,
        kv: &KeyValues,
        mask: Option<&Tensor>,
        pass: Pass<'_>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, dim) = q.dims3()?;
        let q = self.split_heads(q)?;
        let mut scores = q.matmul(&kv.keys.t()?)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = softmax_last(&scores, pass)?;
        let probs = dropout(&probs, self.dropout, pass)?;
        let out = probs.matmul(&kv.values)?; // (b, h, t, d)
        let out = out.transpose(1, 2)?.reshape((b, t, dim))?;
        self.out_proj.forward(&out)
    }
}

impl Attention {
    /// [`Attention::attend`] for one query position per row (a decoding step) with the fused
    /// CPU kernel ([`super::step_attention`]): `x` is `(rows, 1, dim)`, query row `r` reads
    /// key/value row `r / group`, `mask` is additive with one value per key/value row and key.
    /// Inference only (no dropout, no gradient).
    pub fn attend_single_query(
        &self,
        x: &Tensor,
        kv: &KeyValues,
        mask: Option<std::sync::Arc<[f32]>>,
        group: usize,
    ) -> candle_core::Result<Tensor> {
        let q = (self.q_proj.forward(x)? * self.scaling)?;
        self.attend_single_query_projected(&q, kv, mask, group)
    }

    /// [`Attention::attend_single_query`] from already projected and scaled queries `q`
    /// `(rows, 1, dim)`.
    pub fn attend_single_query_projected(
        &self,
        q: &Tensor,
        kv: &KeyValues,
        mask: Option<std::sync::Arc<[f32]>>,
        group: usize,
    ) -> candle_core::Result<Tensor> {
        let (rows, t, dim) = q.dims3()?;
        if t != 1 {
            candle_core::bail!("single-query attention got {t} query positions per row");
        }
        let q = q.reshape((rows, dim))?;
        let out =
            super::step_attention::attend_single_query(&q, &kv.keys, &kv.values, mask, group)?;
        self.out_proj.forward(&out.reshape((rows, 1, dim))?)
    }
}

/// The position-wise feed-forward block `fc2(dropout(act(fc1(x))))`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
    activation_dropout: f64,
}

impl FeedForward {
    /// Prepares `fc1` and `fc2` for inference ([`Linear::prepare_inference`]).
    pub fn prepare_inference(&mut self, quantization: Quantization) -> candle_core::Result<()> {
        self.fc1.prepare_inference(quantization)?;
        self.fc2.prepare_inference(quantization)
    }

    /// Bytes of the `fc1` and `fc2` weights as stored.
    pub fn weight_bytes(&self) -> usize {
        self.fc1.weight_bytes() + self.fc2.weight_bytes()
    }

    /// Loads `fc1` and `fc2` from `vb` (they sit directly in the layer in BART's naming).
    pub fn load(
        dim: usize,
        ffn_dim: usize,
        activation: Activation,
        activation_dropout: f64,
        vb: VarBuilder,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            fc1: linear(dim, ffn_dim, vb.pp("fc1"))?,
            fc2: linear(ffn_dim, dim, vb.pp("fc2"))?,
            activation,
            activation_dropout,
        })
    }

    /// Applies the block.
    pub fn forward(&self, x: &Tensor, pass: Pass<'_>) -> candle_core::Result<Tensor> {
        let h = self.fc1.forward_activated(x, self.activation)?;
        let h = dropout(&h, self.activation_dropout, pass)?;
        self.fc2.forward(&h)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::test_support::max_abs_diff;

    /// Self-attention with random weights of width `dim`, as loaded (frozen tensors).
    fn attention(dim: usize, heads: usize) -> Attention {
        let dev = Device::Cpu;
        let mut tensors = HashMap::new();
        for name in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            let w = Tensor::randn(0f32, 0.3, (dim, dim), &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, dim, &dev).unwrap();
            tensors.insert(format!("{name}.weight"), w);
            tensors.insert(format!("{name}.bias"), b);
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &dev);
        Attention::load(dim, heads, 0.0, vb).unwrap()
    }

    /// Stacking and packing the projections changes no result, for widths that are and are
    /// not whole packed panels.
    #[test]
    fn prepared_attention_matches_the_loaded_one() {
        for (dim, heads) in [(32, 4), (24, 3)] {
            let loaded = attention(dim, heads);
            let mut prepared = loaded.clone();
            prepared.fuse_projections().unwrap();
            prepared.prepare_inference(Quantization::None).unwrap();
            assert!(matches!(prepared.out_proj, Linear::Packed { .. }));
            assert!(matches!(prepared.q_proj, Linear::Packed { .. }));
            assert_eq!(prepared.qkv.is_some(), dim % packed::PANEL == 0);
            let x = Tensor::randn(0f32, 1.0, (2, 5, dim), &Device::Cpu).unwrap();
            let (q0, kv0) = loaded.self_projections(&x).unwrap();
            let (q1, kv1) = prepared.self_projections(&x).unwrap();
            assert!(max_abs_diff(&q0, &q1) < 1e-5, "dim {dim}");
            assert!(max_abs_diff(&kv0.keys, &kv1.keys) < 1e-5);
            assert!(max_abs_diff(&kv0.values, &kv1.values) < 1e-5);
            let a0 = loaded.attend(&x, &kv0, None, Pass::Inference).unwrap();
            let a1 = prepared.attend(&x, &kv1, None, Pass::Inference).unwrap();
            assert!(max_abs_diff(&a0, &a1) < 1e-5, "dim {dim}");
        }
    }

    /// Quantized projections: stacked and viewed as the packed ones are, each product equal to
    /// the int8 product of its own weight (the views compute exactly what separate weights
    /// would), close to the f32 result, and a quarter of the memory plus the scales.
    #[test]
    fn quantized_attention_views_and_accuracy() {
        for (dim, heads) in [(32, 4), (24, 3)] {
            let loaded = attention(dim, heads);
            let mut packed = loaded.clone();
            packed.fuse_projections().unwrap();
            packed.prepare_inference(Quantization::None).unwrap();
            let mut quantized = loaded.clone();
            quantized.fuse_projections().unwrap();
            quantized.prepare_inference(Quantization::Int8).unwrap();
            assert!(matches!(quantized.out_proj, Linear::Quantized { .. }));
            assert!(matches!(quantized.k_proj, Linear::Quantized { .. }));
            assert_eq!(quantized.qkv.is_some(), dim % packed::PANEL == 0);
            let x = Tensor::randn(0f32, 1.0, (2, 5, dim), &Device::Cpu).unwrap();
            let (q0, kv0) = loaded.self_projections(&x).unwrap();
            let (q1, kv1) = quantized.self_projections(&x).unwrap();
            let Linear::Dense { weight, bias } = &loaded.k_proj else {
                panic!("loaded projections are dense")
            };
            let own = QuantizedWeight::quantize(weight).unwrap();
            let bias = bias.to_vec1::<f32>().unwrap();
            let want = own
                .linear(&x.reshape((10, dim)).unwrap(), Some(&bias))
                .unwrap()
                .reshape((2, 5, heads, dim / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap();
            assert_eq!(max_abs_diff(&kv1.keys, &want), 0.0, "dim {dim}");
            let scale = |t: &Tensor| max_abs_diff(t, &t.zeros_like().unwrap());
            for (a, b) in [
                (&q0, &q1),
                (&kv0.keys, &kv1.keys),
                (&kv0.values, &kv1.values),
            ] {
                assert!(max_abs_diff(a, b) < 0.1 * scale(a), "dim {dim}");
            }
            let bytes = quantized.weight_bytes() as f64 / packed.weight_bytes() as f64;
            // Codes, plus a scale and a code sum (8 bytes) per output: (dim + 8) / (4 dim).
            let want = (dim.div_ceil(4) * 4 + 8) as f64 / (4 * dim) as f64;
            assert!((bytes - want).abs() < 0.02, "dim {dim}: {bytes} vs {want}");
        }
    }
}
