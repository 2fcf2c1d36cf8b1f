//! BART for conditional generation, computing what transformers' `BartForConditionalGeneration`
//! computes (and mBART's pre-LN variant when the config asks for it).
//!
//! Tensor names follow transformers exactly: `model.shared.weight`, `model.encoder.layers.0.…`,
//! `final_logits_bias`, `lm_head.weight` (tied to the shared embedding unless
//! `tie_word_embeddings` is false).

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::kv_cache::{to_cache_dtype, SelfAttentionCache};
use super::layers::{
    additive_causal_mask, additive_padding_mask, dropout, matmul_weight_t, Attention, FeedForward,
    KeyValues, LayerNorm, Pass,
};
use super::options::{is_cache_dtype, Quantization};
use super::packed::PackedWeight;
use super::quantized::QuantizedWeight;
use super::step_attention;
use crate::config::BartConfig;
use crate::error::{Error, Result};

/// A `(vocab, d_model)` matrix: the token embedding table, which is also the LM head when the
/// embeddings are tied.
#[derive(Debug, Clone)]
enum VocabMatrix {
    /// As loaded (trainable, or not f32 on the CPU).
    Dense(Tensor),
    /// Frozen f32 on the CPU, packed for the product kernel (lookups read rows from it).
    Packed(PackedWeight),
    /// Frozen on the CPU, quantized to int8 (lookups read dequantized rows from it, converted
    /// to `dtype`, the model's).
    Quantized {
        /// The matrix.
        weight: QuantizedWeight,
        /// The dtype rows are looked up in (the loaded matrix's).
        dtype: DType,
    },
}

impl VocabMatrix {
    /// The packed (or, with [`Quantization::Int8`], quantized) form of a frozen CPU matrix, or
    /// the matrix as it is.
    fn for_inference(m: &Tensor, quantization: Quantization) -> candle_core::Result<Self> {
        if quantization == Quantization::Int8 && !m.is_variable() && m.device().is_cpu() {
            return Ok(VocabMatrix::Quantized {
                weight: QuantizedWeight::quantize(m)?,
                dtype: m.dtype(),
            });
        }
        Ok(match PackedWeight::pack_frozen(m)? {
            Some(p) => VocabMatrix::Packed(p),
            None => VocabMatrix::Dense(m.clone()),
        })
    }

    /// Rows `ids` (flattened), `(ids, d_model)`.
    fn select_rows(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            VocabMatrix::Dense(m) => m.index_select(&ids.flatten_all()?, 0),
            VocabMatrix::Packed(p) => p.select_rows(ids),
            VocabMatrix::Quantized { weight, dtype } => weight.select_rows(ids)?.to_dtype(*dtype),
        }
    }

    /// Bytes of the matrix as stored.
    fn bytes(&self) -> usize {
        match self {
            VocabMatrix::Dense(m) => m.elem_count() * m.dtype().size_in_bytes(),
            VocabMatrix::Packed(p) => p.bytes(),
            VocabMatrix::Quantized { weight, .. } => weight.bytes(),
        }
    }
}

/// Token and position embeddings, plus the optional `layernorm_embedding`.
#[derive(Debug, Clone)]
struct Embeddings {
    tokens: VocabMatrix,
    positions: Tensor,
    layernorm: Option<LayerNorm>,
    scale: f64,
    offset: usize,
}

impl Embeddings {
    fn load(cfg: &BartConfig, tokens: VocabMatrix, vb: &VarBuilder) -> candle_core::Result<Self> {
        let positions = vb.get_with_hints(
            (cfg.position_table_rows(), cfg.d_model),
            "embed_positions.weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: cfg.init_std,
            },
        )?;
        let layernorm = if cfg.normalize_embedding {
            Some(LayerNorm::load(cfg.d_model, vb.pp("layernorm_embedding"))?)
        } else {
            None
        };
        Ok(Self {
            tokens,
            positions,
            layernorm,
            scale: cfg.embed_scale(),
            offset: cfg.extra_pos_embeddings,
        })
    }

    /// Embeds `ids` `(batch, len)` whose first position is `past` (for cached decoding).
    fn forward(&self, ids: &Tensor, past: usize, pass: Pass<'_>) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let rows = self.positions.dim(0)?;
        if past + t + self.offset > rows {
            candle_core::bail!(
                "sequence of {} positions exceeds the model's max_position_embeddings ({})",
                past + t,
                rows - self.offset
            );
        }
        let mut x = self.tokens.select_rows(ids)?.reshape((b, t, ()))?;
        if self.scale != 1.0 {
            x = (x * self.scale)?;
        }
        let start = (past + self.offset) as u32;
        let pos_ids = Tensor::arange(start, start + t as u32, ids.device())?;
        let pos = self.positions.index_select(&pos_ids, 0)?;
        let mut x = x.broadcast_add(&pos)?;
        if let Some(ln) = &self.layernorm {
            x = ln.forward(&x, pass)?;
        }
        Ok(x)
    }
}

/// One encoder layer.
#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    ffn: FeedForward,
    final_layer_norm: LayerNorm,
    dropout: f64,
    pre_ln: bool,
}

impl EncoderLayer {
    fn load(cfg: &BartConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let act = cfg.activation().map_err(candle_core::Error::msg)?;
        Ok(Self {
            self_attn: Attention::load(
                cfg.d_model,
                cfg.encoder_attention_heads,
                cfg.attention_dropout,
                vb.pp("self_attn"),
            )?,
            self_attn_layer_norm: LayerNorm::load(cfg.d_model, vb.pp("self_attn_layer_norm"))?,
            ffn: FeedForward::load(
                cfg.d_model,
                cfg.encoder_ffn_dim,
                act,
                cfg.activation_dropout,
                vb.clone(),
            )?,
            final_layer_norm: LayerNorm::load(cfg.d_model, vb.pp("final_layer_norm"))?,
            dropout: cfg.dropout,
            pre_ln: cfg.pre_layer_norm(),
        })
    }

    /// Fuses the self-attention projections and packs (or quantizes) every frozen matrix.
    fn prepare_inference(&mut self, quantization: Quantization) -> candle_core::Result<()> {
        self.self_attn.fuse_projections()?;
        self.self_attn.prepare_inference(quantization)?;
        self.ffn.prepare_inference(quantization)
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        pass: Pass<'_>,
    ) -> candle_core::Result<Tensor> {
        if self.pre_ln {
            let h = self.self_attn_layer_norm.forward(x, pass)?;
            let (q, kv) = self.self_attn.self_projections(&h)?;
            let h = self.self_attn.attend_query(&q, &kv, mask, pass)?;
            let x = (x + dropout(&h, self.dropout, pass)?)?;
            let h = self.final_layer_norm.forward(&x, pass)?;
            let h = self.ffn.forward(&h, pass)?;
            x + dropout(&h, self.dropout, pass)?
        } else {
            let (q, kv) = self.self_attn.self_projections(x)?;
            let h = self.self_attn.attend_query(&q, &kv, mask, pass)?;
            let h = dropout(&h, self.dropout, pass)?;
            let x = self.self_attn_layer_norm.forward_residual(x, &h, pass)?;
            let h = dropout(&self.ffn.forward(&x, pass)?, self.dropout, pass)?;
            self.final_layer_norm.forward_residual(&x, &h, pass)
        }
    }
}

/// One decoder layer.
#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    self_attn_layer_norm: LayerNorm,
    encoder_attn: Attention,
    encoder_attn_layer_norm: LayerNorm,
    ffn: FeedForward,
    final_layer_norm: LayerNorm,
    dropout: f64,
    pre_ln: bool,
}

/// The encoder's padding mask as cross-attention uses it.
#[derive(Debug, Clone, Default)]
struct EncoderMask {
    /// Additive `(rows, 1, 1, keys)` mask in the model's dtype (`None`: nothing masked).
    additive: Option<Tensor>,
    /// The same values as f32 on the host, `rows × keys`, for the fused CPU step kernel
    /// (present when that kernel applies).
    host: Option<Arc<[f32]>>,
}

impl EncoderMask {
    fn new(mask: Option<&Tensor>, dtype: DType) -> candle_core::Result<Self> {
        let Some(mask) = mask else {
            return Ok(Self::default());
        };
        let additive = additive_padding_mask(mask, dtype)?;
        let host = if step_attention::applies(&additive) {
            Some(additive.flatten_all()?.to_vec1::<f32>()?.into())
        } else {
            None
        };
        Ok(Self {
            additive: Some(additive),
            host,
        })
    }
}

/// Whether `x` `(rows, positions, dim)` is a single-position inference step that the fused CPU
/// attention kernel can serve.
fn single_query_step(x: &Tensor, pass: Pass<'_>) -> candle_core::Result<bool> {
    Ok(!pass.differentiable() && x.dim(1)? == 1 && step_attention::applies(x))
}

/// Cached keys and values of one decoder layer.
#[derive(Debug, Clone)]
struct LayerCache {
    self_kv: SelfAttentionCache,
    cross_kv: KeyValues,
}

impl DecoderLayer {
    fn load(cfg: &BartConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let act = cfg.activation().map_err(candle_core::Error::msg)?;
        let heads = cfg.decoder_attention_heads;
        Ok(Self {
            self_attn: Attention::load(
                cfg.d_model,
                heads,
                cfg.attention_dropout,
                vb.pp("self_attn"),
            )?,
            self_attn_layer_norm: LayerNorm::load(cfg.d_model, vb.pp("self_attn_layer_norm"))?,
            encoder_attn: Attention::load(
                cfg.d_model,
                heads,
                cfg.attention_dropout,
                vb.pp("encoder_attn"),
            )?,
            encoder_attn_layer_norm: LayerNorm::load(
                cfg.d_model,
                vb.pp("encoder_attn_layer_norm"),
            )?,
            ffn: FeedForward::load(
                cfg.d_model,
                cfg.decoder_ffn_dim,
                act,
                cfg.activation_dropout,
                vb.clone(),
            )?,
            final_layer_norm: LayerNorm::load(cfg.d_model, vb.pp("final_layer_norm"))?,
            dropout: cfg.dropout,
            pre_ln: cfg.pre_layer_norm(),
        })
    }

    /// Self-attention sub-block. Without a cache `x` attends to itself (under `mask`); with one,
    /// `x`'s keys/values are appended to it and `x` attends to everything cached.
    /// Fuses the self-attention projections and packs (or quantizes) every frozen matrix.
    fn prepare_inference(&mut self, quantization: Quantization) -> candle_core::Result<()> {
        self.self_attn.fuse_projections()?;
        self.self_attn.prepare_inference(quantization)?;
        self.encoder_attn.prepare_inference(quantization)?;
        self.ffn.prepare_inference(quantization)
    }

    fn self_block(
        &self,
        x: &Tensor,
        cache: Option<&mut SelfAttentionCache>,
        mask: Option<&Tensor>,
        pass: Pass<'_>,
    ) -> candle_core::Result<Tensor> {
        let input = if self.pre_ln {
            self.self_attn_layer_norm.forward(x, pass)?
        } else {
            x.clone()
        };
        let (q, new_kv) = self.self_attn.self_projections(&input)?;
        let h = match cache {
            None => self.self_attn.attend_query(&q, &new_kv, mask, pass)?,
            Some(cache) => {
                cache.append(&new_kv)?;
                let kv = cache.view()?.expect("the cache was just written");
                if mask.is_none() && single_query_step(&input, pass)? {
                    // The fused kernel reads an f16/bf16 cache as it is, converting inside.
                    self.self_attn
                        .attend_single_query_projected(&q, &kv, None, 1)?
                } else {
                    let kv = kv.to_dtype(q.dtype())?;
                    self.self_attn.attend_query(&q, &kv, mask, pass)?
                }
            }
        };
        let h = dropout(&h, self.dropout, pass)?;
        if self.pre_ln {
            x + h
        } else {
            self.self_attn_layer_norm.forward_residual(x, &h, pass)
        }
    }

    /// Cross-attention from `x` `(rows · group, t, dim)` to `cross_kv` of `rows` encoder
    /// outputs: each run of `group` consecutive decoder rows (the beams of one input) shares one
    /// encoder row, so their queries are stacked along the query axis of that row instead of
    /// the encoder output being copied once per beam.
    fn cross_attend(
        &self,
        x: &Tensor,
        cross_kv: &KeyValues,
        encoder_mask: &EncoderMask,
        group: usize,
        pass: Pass<'_>,
    ) -> candle_core::Result<Tensor> {
        if single_query_step(x, pass)?
            && (encoder_mask.additive.is_none() || encoder_mask.host.is_some())
        {
            return self.encoder_attn.attend_single_query(
                x,
                cross_kv,
                encoder_mask.host.clone(),
                group,
            );
        }
        let encoder_mask = encoder_mask.additive.as_ref();
        // A cache stored in another dtype than the model computes in (f16 or bf16 keys/values).
        let cross_kv = &cross_kv.to_dtype(x.dtype())?;
        if group == 1 {
            return self.encoder_attn.attend(x, cross_kv, encoder_mask, pass);
        }
        let (rows, t, dim) = x.dims3()?;
        let stacked = x.reshape((rows / group, group * t, dim))?;
        self.encoder_attn
            .attend(&stacked, cross_kv, encoder_mask, pass)?
            .reshape((rows, t, dim))
    }

    fn cross_and_ffn(
        &self,
        x: &Tensor,
        cross_kv: &KeyValues,
        encoder_mask: &EncoderMask,
        group: usize,
        pass: Pass<'_>,
    ) -> candle_core::Result<Tensor> {
        let x = if self.pre_ln {
            let h = self.encoder_attn_layer_norm.forward(x, pass)?;
            let h = self.cross_attend(&h, cross_kv, encoder_mask, group, pass)?;
            let x = (x + dropout(&h, self.dropout, pass)?)?;
            let h = self
                .ffn
                .forward(&self.final_layer_norm.forward(&x, pass)?, pass)?;
            return x + dropout(&h, self.dropout, pass)?;
        } else {
            let h = self.cross_attend(x, cross_kv, encoder_mask, group, pass)?;
            let h = dropout(&h, self.dropout, pass)?;
            self.encoder_attn_layer_norm.forward_residual(x, &h, pass)?
        };
        let h = dropout(&self.ffn.forward(&x, pass)?, self.dropout, pass)?;
        self.final_layer_norm.forward_residual(&x, &h, pass)
    }
}

/// Incremental-decoding state for a batch: the encoder's padding mask and, per decoder layer,
/// the self-attention keys/values so far and the cross-attention keys/values (computed once).
#[derive(Debug, Clone)]
pub struct DecoderCache {
    encoder_mask: EncoderMask,
    layers: Vec<LayerCache>,
    past: usize,
    /// Decoder rows per encoder row (the beams of one input).
    group: usize,
}

impl DecoderCache {
    /// Decoder positions already processed.
    pub fn past_len(&self) -> usize {
        self.past
    }

    /// Number of rows (sequences) in the cache.
    pub fn batch_size(&self) -> Result<usize> {
        Ok(self.layers[0].cross_kv.keys.dim(0)? * self.group)
    }

    /// Reserves room for `positions` decoder positions in every layer's self-attention cache
    /// (e.g. the generation's maximum length), so that decoding never grows the buffers.
    /// Only affects layers that have not been written yet.
    pub fn reserve(&mut self, positions: usize) {
        for layer in &mut self.layers {
            layer.self_kv.reserve(positions);
        }
    }

    /// The dtype the keys and values are stored in.
    pub fn dtype(&self) -> DType {
        self.layers
            .first()
            .map_or(DType::F32, |l| l.cross_kv.dtype())
    }

    /// Bytes held by the cached keys and values: every layer's cross-attention keys/values and
    /// its self-attention buffers (their whole capacity).
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        self.layers
            .iter()
            .map(|l| size(&l.cross_kv.keys) + size(&l.cross_kv.values) + l.self_kv.bytes())
            .sum()
    }

    /// Keeps only the given encoder rows (positions in the current batch, in order) with their
    /// `group` decoder rows each: inputs whose generation is over leave the batch, so later
    /// steps do not compute them.
    pub fn retain_groups(&mut self, keep: &[usize]) -> Result<()> {
        let device = self.layers[0].cross_kv.keys.device().clone();
        let enc_rows: Vec<u32> = keep.iter().map(|&i| i as u32).collect();
        let enc_idx = Tensor::new(enc_rows.as_slice(), &device)?;
        let group = self.group;
        let dec_rows: Vec<u32> = keep
            .iter()
            .flat_map(|&i| (i * group..(i + 1) * group).map(|r| r as u32))
            .collect();
        for layer in &mut self.layers {
            layer.cross_kv = layer.cross_kv.select_rows(&enc_idx)?;
            layer.self_kv.select_rows(&dec_rows)?;
        }
        if let Some(additive) = &self.encoder_mask.additive {
            let keys = additive.dim(3)?;
            self.encoder_mask.host = self.encoder_mask.host.as_ref().map(|host| {
                keep.iter()
                    .flat_map(|&i| host[i * keys..(i + 1) * keys].iter().copied())
                    .collect::<Vec<f32>>()
                    .into()
            });
            self.encoder_mask.additive = Some(additive.index_select(&enc_idx, 0)?);
        }
        Ok(())
    }

    /// Decoder rows per encoder row.
    pub fn group(&self) -> usize {
        self.group
    }

    /// Multiplies the decoder rows of every encoder row by `factor`: row `r` becomes rows
    /// `r · factor ..< (r + 1) · factor`, each a copy of its self-attention history. Beam search
    /// runs its first step — where an input's beams are all the same sequence — once per input
    /// and then widens the cache to the beams.
    pub fn widen_groups(&mut self, factor: usize) -> Result<()> {
        if factor == 0 {
            return Err(Error::Invalid("cannot widen decoding groups by 0".into()));
        }
        let rows = self.batch_size()?;
        let copies: Vec<u32> = (0..rows as u32)
            .flat_map(|r| std::iter::repeat_n(r, factor))
            .collect();
        for layer in &mut self.layers {
            layer.self_kv.select_rows(&copies)?;
        }
        self.group *= factor;
        Ok(())
    }

    /// Keeps, in order, the self-attention history of the given rows (beam search reordering).
    ///
    /// Cross-attention keys/values are not reordered: beam search only moves hypotheses between
    /// beams of the same input, whose encoder outputs are identical.
    pub fn reorder(&mut self, rows: &[u32]) -> Result<()> {
        for layer in &mut self.layers {
            layer.self_kv.reorder(rows)?;
        }
        Ok(())
    }
}

/// The encoder stack.
#[derive(Debug, Clone)]
struct Encoder {
    embeddings: Embeddings,
    layers: Vec<EncoderLayer>,
    final_norm: Option<LayerNorm>,
    dropout: f64,
}

/// The decoder stack.
#[derive(Debug, Clone)]
struct Decoder {
    embeddings: Embeddings,
    layers: Vec<DecoderLayer>,
    final_norm: Option<LayerNorm>,
    dropout: f64,
}

/// BART with its language-modelling head.
#[derive(Debug, Clone)]
pub struct Bart {
    config: BartConfig,
    encoder: Encoder,
    decoder: Decoder,
    lm_head: VocabMatrix,
    final_logits_bias: Tensor,
    /// `final_logits_bias` is a constant zero (transformers' default buffer, never trained):
    /// adding it would be a pass over every logit for nothing.
    logits_bias_is_zero: bool,
    /// `final_logits_bias` as host values, for a packed or quantized LM head when it is not
    /// zero.
    host_logits_bias: Option<Arc<[f32]>>,
    dtype: DType,
    device: Device,
    /// How the weight matrices are stored.
    quantization: Quantization,
    /// The dtype decoder caches store keys and values in.
    kv_cache_dtype: DType,
}

impl Bart {
    /// Builds the model from tensors named as transformers names them (see the module docs).
    pub fn load(config: &BartConfig, vb: VarBuilder) -> Result<Self> {
        Self::load_quantized(config, vb, Quantization::None)
    }

    /// [`Bart::load`] with the weight matrices of frozen tensors stored as `quantization` says
    /// ([`Quantization::Int8`]: every linear layer and the token embedding / LM head quantized
    /// from the loaded f32, f16 or bf16 values, which they replace). int8 runs on the CPU only:
    /// on another device it is an error.
    pub fn load_quantized(
        config: &BartConfig,
        vb: VarBuilder,
        quantization: Quantization,
    ) -> Result<Self> {
        if quantization == Quantization::Int8 && !vb.device().is_cpu() {
            return Err(int8_device_error(vb.device()));
        }
        Self::load_inner(config, vb, quantization).map_err(|e| Error::Weights(e.to_string()))
    }

    fn load_inner(
        cfg: &BartConfig,
        vb: VarBuilder,
        quantization: Quantization,
    ) -> candle_core::Result<Self> {
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: cfg.init_std,
        };
        // Each weight matrix is replaced by its packed or int8 form as soon as its layer is
        // built: with a lazily reading builder (`weights::LazyWeights`) only one layer's loaded
        // weights are resident at a time.
        let shared =
            vb.get_with_hints((cfg.vocab_size, cfg.d_model), "model.shared.weight", init)?;
        let tokens = VocabMatrix::for_inference(&shared, quantization)?;
        let lm_head = if cfg.tie_word_embeddings {
            tokens.clone()
        } else {
            let lm_head =
                vb.get_with_hints((cfg.vocab_size, cfg.d_model), "lm_head.weight", init)?;
            VocabMatrix::for_inference(&lm_head, quantization)?
        };
        drop(shared);
        let enc_vb = vb.pp("model.encoder");
        let dec_vb = vb.pp("model.decoder");
        let final_norm = |vb: &VarBuilder| -> candle_core::Result<Option<LayerNorm>> {
            if cfg.final_layer_norm() {
                Ok(Some(LayerNorm::load(cfg.d_model, vb.pp("layer_norm"))?))
            } else {
                Ok(None)
            }
        };
        let encoder = Encoder {
            embeddings: Embeddings::load(cfg, tokens.clone(), &enc_vb)?,
            layers: (0..cfg.encoder_layers)
                .map(|i| {
                    let mut layer = EncoderLayer::load(cfg, enc_vb.pp(format!("layers.{i}")))?;
                    layer.prepare_inference(quantization)?;
                    Ok(layer)
                })
                .collect::<candle_core::Result<_>>()?,
            final_norm: final_norm(&enc_vb)?,
            dropout: cfg.dropout,
        };
        let decoder = Decoder {
            embeddings: Embeddings::load(cfg, tokens, &dec_vb)?,
            layers: (0..cfg.decoder_layers)
                .map(|i| {
                    let mut layer = DecoderLayer::load(cfg, dec_vb.pp(format!("layers.{i}")))?;
                    layer.prepare_inference(quantization)?;
                    Ok(layer)
                })
                .collect::<candle_core::Result<_>>()?,
            final_norm: final_norm(&dec_vb)?,
            dropout: cfg.dropout,
        };
        let final_logits_bias = vb.get_with_hints(
            (1, cfg.vocab_size),
            "final_logits_bias",
            candle_nn::Init::Const(0.0),
        )?;
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        let logits_bias_is_zero = !final_logits_bias.is_variable()
            && final_logits_bias
                .to_dtype(DType::F32)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
                == 0.0;
        let host_logits_bias = match lm_head {
            VocabMatrix::Packed(_) | VocabMatrix::Quantized { .. } if !logits_bias_is_zero => Some(
                final_logits_bias
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into(),
            ),
            _ => None,
        };
        Ok(Self {
            config: cfg.clone(),
            encoder,
            decoder,
            lm_head,
            final_logits_bias,
            logits_bias_is_zero,
            host_logits_bias,
            dtype,
            device,
            quantization,
            kv_cache_dtype: dtype,
        })
    }

    /// The configuration the model was built from.
    pub fn config(&self) -> &BartConfig {
        &self.config
    }

    /// The dtype of the weights and activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How the weight matrices are stored.
    pub fn quantization(&self) -> Quantization {
        self.quantization
    }

    /// The dtype decoder caches ([`DecoderCache`]) store keys and values in: the model's dtype
    /// unless [`Bart::set_kv_cache_dtype`] chose another.
    pub fn kv_cache_dtype(&self) -> DType {
        self.kv_cache_dtype
    }

    /// Stores the keys and values of the decoder caches started from now on in `dtype` (f32,
    /// f16 or bf16; `None`: the model's dtype). Attention converts them back to the model's
    /// dtype as it reads them (on the CPU in f32, inside the fused step kernel).
    pub fn set_kv_cache_dtype(&mut self, dtype: Option<DType>) -> Result<()> {
        let dtype = dtype.unwrap_or(self.dtype);
        if !is_cache_dtype(dtype) {
            return Err(Error::Invalid(format!(
                "a key/value cache cannot be stored in {dtype:?} (use f32, f16 or bf16)"
            )));
        }
        self.kv_cache_dtype = dtype;
        Ok(())
    }

    /// Bytes held by the weight matrices (every linear layer's, the token embedding and the LM
    /// head, each shared matrix once) as stored: packed f32, int8 codes with their scales, or
    /// as loaded. Layer norms, biases and position embeddings are not counted.
    pub fn matrix_bytes(&self) -> usize {
        let enc: usize = self
            .encoder
            .layers
            .iter()
            .map(|l| l.self_attn.weight_bytes() + l.ffn.weight_bytes())
            .sum();
        let dec: usize = self
            .decoder
            .layers
            .iter()
            .map(|l| {
                l.self_attn.weight_bytes() + l.encoder_attn.weight_bytes() + l.ffn.weight_bytes()
            })
            .sum();
        let head = if self.config.tie_word_embeddings {
            0
        } else {
            self.lm_head.bytes()
        };
        enc + dec + self.encoder.embeddings.tokens.bytes() + head
    }

    /// Runs the encoder on `input_ids` `(batch, len)` with an optional 0/1 `attention_mask`
    /// `(batch, len)`; returns hidden states `(batch, len, d_model)`.
    pub fn encode(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        pass: Pass<'_>,
    ) -> Result<Tensor> {
        let mask = attention_mask
            .map(|m| additive_padding_mask(m, self.dtype))
            .transpose()?;
        let mut x = self.encoder.embeddings.forward(input_ids, 0, pass)?;
        x = dropout(&x, self.encoder.dropout, pass)?;
        for layer in &self.encoder.layers {
            x = layer.forward(&x, mask.as_ref(), pass)?;
        }
        if let Some(ln) = &self.encoder.final_norm {
            x = ln.forward(&x, pass)?;
        }
        Ok(x)
    }

    /// Teacher-forced decoder pass over whole sequences (training, validation, scoring).
    ///
    /// `decoder_attention_mask` `(batch, tgt)` masks padded decoder positions as keys, in addition
    /// to the causal mask. Returns logits `(batch, tgt, vocab)`.
    pub fn decode(
        &self,
        decoder_input_ids: &Tensor,
        encoder_hidden: &Tensor,
        encoder_mask: Option<&Tensor>,
        decoder_attention_mask: Option<&Tensor>,
        pass: Pass<'_>,
    ) -> Result<Tensor> {
        let (b, t) = decoder_input_ids.dims2()?;
        let enc_mask = EncoderMask {
            additive: encoder_mask
                .map(|m| additive_padding_mask(m, self.dtype))
                .transpose()?,
            host: None,
        };
        let self_mask =
            additive_causal_mask(b, t, 0, decoder_attention_mask, self.dtype, &self.device)?;
        let mut x = self
            .decoder
            .embeddings
            .forward(decoder_input_ids, 0, pass)?;
        x = dropout(&x, self.decoder.dropout, pass)?;
        for layer in &self.decoder.layers {
            let h = layer.self_block(&x, None, Some(&self_mask), pass)?;
            let cross_kv = layer.encoder_attn.key_values(encoder_hidden)?;
            x = layer.cross_and_ffn(&h, &cross_kv, &enc_mask, 1, pass)?;
        }
        if let Some(ln) = &self.decoder.final_norm {
            x = ln.forward(&x, pass)?;
        }
        self.lm_logits(&x)
    }

    /// Full forward pass: encoder then teacher-forced decoder. Returns logits `(batch, tgt, vocab)`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        decoder_input_ids: &Tensor,
        decoder_attention_mask: Option<&Tensor>,
        pass: Pass<'_>,
    ) -> Result<Tensor> {
        let enc = self.encode(input_ids, attention_mask, pass)?;
        self.decode(
            decoder_input_ids,
            &enc,
            attention_mask,
            decoder_attention_mask,
            pass,
        )
    }

    /// Prepares incremental decoding: computes every layer's cross-attention keys/values once.
    pub fn start_decoding(
        &self,
        encoder_hidden: &Tensor,
        encoder_mask: Option<&Tensor>,
    ) -> Result<DecoderCache> {
        self.start_decoding_grouped(encoder_hidden, encoder_mask, 1)
    }

    /// [`Bart::start_decoding`] for `group` decoder rows per encoder row (beam search with
    /// `group` beams): the cache decodes `rows · group` sequences, row `i · group + j` reading
    /// encoder row `i`, without copying encoder outputs or cross-attention keys/values per beam.
    pub fn start_decoding_grouped(
        &self,
        encoder_hidden: &Tensor,
        encoder_mask: Option<&Tensor>,
        group: usize,
    ) -> Result<DecoderCache> {
        if group == 0 {
            return Err(Error::Invalid(
                "a decoding group needs at least one row".into(),
            ));
        }
        let dtype = self.kv_cache_dtype;
        let layers = self
            .decoder
            .layers
            .iter()
            .map(|l| {
                let kv = l.encoder_attn.key_values(encoder_hidden)?;
                Ok(LayerCache {
                    self_kv: SelfAttentionCache::stored_as(dtype),
                    cross_kv: KeyValues {
                        keys: to_cache_dtype(&kv.keys, dtype)?,
                        values: to_cache_dtype(&kv.values, dtype)?,
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let encoder_mask = EncoderMask::new(encoder_mask, self.dtype)?;
        Ok(DecoderCache {
            encoder_mask,
            layers,
            past: 0,
            group,
        })
    }

    /// Decodes the next `(batch, new)` tokens given the cache, appending their keys/values.
    /// Returns logits `(batch, new, vocab)`.
    pub fn decode_step(&self, ids: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        let hidden = self.decode_step_hidden(ids, cache)?;
        self.lm_logits(&hidden)
    }

    /// [`Bart::decode_step`] returning the logits as f32 host values, `batch · new` rows of
    /// `vocab` (row-major), with the vocabulary size. On the CPU in f32 the logits are written
    /// straight into the returned buffer (no tensor to copy out of).
    pub fn decode_step_to_host(
        &self,
        ids: &Tensor,
        cache: &mut DecoderCache,
    ) -> Result<(Vec<f32>, usize)> {
        let hidden = self.decode_step_hidden(ids, cache)?;
        let vocab = self.config.vocab_size;
        let bias = self.host_logits_bias.as_deref();
        match &self.lm_head {
            VocabMatrix::Packed(lm_head) => {
                let (b, t, d) = hidden.dims3()?;
                let hidden = hidden.reshape((b * t, d))?;
                return Ok((lm_head.linear_to_host(&hidden, bias)?, vocab));
            }
            VocabMatrix::Quantized { weight, .. } => {
                let (b, t, d) = hidden.dims3()?;
                let hidden = hidden.reshape((b * t, d))?.to_dtype(DType::F32)?;
                return Ok((weight.linear_to_host(&hidden, bias)?, vocab));
            }
            VocabMatrix::Dense(_) => {}
        }
        let logits = self
            .lm_logits(&hidden)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok((logits, vocab))
    }

    /// The decoder's last hidden states `(batch, new, d_model)` for the next `(batch, new)`
    /// tokens (see [`Bart::decode_step`]).
    fn decode_step_hidden(&self, ids: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let past = cache.past;
        let self_mask = if t > 1 {
            Some(additive_causal_mask(
                b,
                t,
                past,
                None,
                self.dtype,
                &self.device,
            )?)
        } else {
            None // a single new position may attend to every earlier one
        };
        let mut x = self
            .decoder
            .embeddings
            .forward(ids, past, Pass::Inference)?;
        for (layer, lc) in self.decoder.layers.iter().zip(cache.layers.iter_mut()) {
            let h = layer.self_block(
                &x,
                Some(&mut lc.self_kv),
                self_mask.as_ref(),
                Pass::Inference,
            )?;
            x = layer.cross_and_ffn(
                &h,
                &lc.cross_kv,
                &cache.encoder_mask,
                cache.group,
                Pass::Inference,
            )?;
        }
        if let Some(ln) = &self.decoder.final_norm {
            x = ln.forward(&x, Pass::Inference)?;
        }
        cache.past += t;
        Ok(x)
    }

    fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, d) = hidden.dims3()?;
        let hidden = hidden.reshape((b * t, d))?;
        let mut logits = match &self.lm_head {
            VocabMatrix::Packed(lm_head) => {
                let logits = lm_head.linear(&hidden, self.host_logits_bias.as_deref())?;
                return Ok(logits.reshape((b, t, ()))?);
            }
            VocabMatrix::Quantized { weight, .. } => {
                let hidden = hidden.to_dtype(DType::F32)?;
                let logits = weight.linear(&hidden, self.host_logits_bias.as_deref())?;
                return Ok(logits.to_dtype(self.dtype)?.reshape((b, t, ()))?);
            }
            VocabMatrix::Dense(lm_head) => matmul_weight_t(&hidden, lm_head)?,
        };
        if !self.logits_bias_is_zero {
            logits = logits.broadcast_add(&self.final_logits_bias)?;
        }
        Ok(logits.reshape((b, t, ()))?)
    }
}

/// The error of int8 on a device other than the CPU.
pub(crate) fn int8_device_error(device: &Device) -> Error {
    let name = match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_string(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    };
    Error::Invalid(format!(
        "int8 quantization (--quantize int8) runs on the CPU only, not on {name}: use \
         --device cpu, or --quantize none on a GPU"
    ))
}
