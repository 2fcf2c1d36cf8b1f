//! Writes a model folder with KoBART-v1's shapes and random weights, for benchmarks — what
//! `scripts/make_random_kobart.py` writes, without Python or torch.
//!
//! ```text
//! cargo run --release -p kb-core --example random_kobart -- /tmp/kobart-random [SEED]
//! KB_BENCH_MODEL=/tmp/kobart-random KB_BENCH_QUANTIZE=none,int8 cargo bench -p kb-core --bench generate
//! ```
//!
//! KoBART-v1 (gogamza/kobart-base-v1): 30000 tokens, d_model 768, 6+6 layers, 16 heads, FFN
//! 3072, 1026 positions, pad 3, eos 1, decoder start 1; tied embeddings. Weights are drawn as
//! transformers initialises a `BartForConditionalGeneration` (N(0, 0.02) matrices and
//! embeddings with the padding row zero, zero biases, unit layer norms), in f32, under the
//! tensor names transformers writes. The tokenizer is the real KoBART tokenizer from
//! `../shared/kobart-tokenizer` when present, else the test fixture's (smaller than the
//! vocabulary; fine for timing).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kb_core::candle_core::{Device, Result, Tensor};
use rand::SeedableRng;
use rand_distr::Distribution;

const VOCAB: usize = 30000;
const D_MODEL: usize = 768;
const LAYERS: usize = 6;
const HEADS: usize = 16;
const FFN: usize = 3072;
const POSITIONS: usize = 1026;
/// BART's learned positions start at index 2.
const POSITION_OFFSET: usize = 2;
const PAD: usize = 3;
const INIT_STD: f32 = 0.02;

struct Weights {
    tensors: HashMap<String, Tensor>,
    rng: rand_chacha::ChaCha8Rng,
}

impl Weights {
    fn normal(&mut self, name: &str, rows: usize, cols: usize) -> Result<()> {
        let normal = rand_distr::Normal::new(0f32, INIT_STD).expect("a valid σ");
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| normal.sample(&mut self.rng))
            .collect();
        let t = Tensor::from_vec(v, (rows, cols), &Device::Cpu)?;
        self.tensors.insert(name.to_string(), t);
        Ok(())
    }

    fn constant(&mut self, name: &str, value: f32, dims: &[usize]) -> Result<()> {
        let t = Tensor::full(value, dims, &Device::Cpu)?;
        self.tensors.insert(name.to_string(), t);
        Ok(())
    }

    fn linear(&mut self, prefix: &str, outputs: usize, inputs: usize) -> Result<()> {
        self.normal(&format!("{prefix}.weight"), outputs, inputs)?;
        self.constant(&format!("{prefix}.bias"), 0.0, &[outputs])
    }

    fn layer_norm(&mut self, prefix: &str) -> Result<()> {
        self.constant(&format!("{prefix}.weight"), 1.0, &[D_MODEL])?;
        self.constant(&format!("{prefix}.bias"), 0.0, &[D_MODEL])
    }

    fn attention(&mut self, prefix: &str) -> Result<()> {
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            self.linear(&format!("{prefix}.{proj}"), D_MODEL, D_MODEL)?;
        }
        Ok(())
    }
}

fn config_json() -> serde_json::Value {
    serde_json::json!({
        "model_type": "bart",
        "architectures": ["BartForConditionalGeneration"],
        "vocab_size": VOCAB,
        "max_position_embeddings": POSITIONS,
        "d_model": D_MODEL,
        "encoder_layers": LAYERS,
        "decoder_layers": LAYERS,
        "encoder_attention_heads": HEADS,
        "decoder_attention_heads": HEADS,
        "encoder_ffn_dim": FFN,
        "decoder_ffn_dim": FFN,
        "activation_function": "gelu",
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "activation_dropout": 0.0,
        "init_std": INIT_STD,
        "scale_embedding": false,
        "normalize_before": false,
        "add_final_layer_norm": false,
        "tie_word_embeddings": true,
        "pad_token_id": PAD,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 1,
        "forced_eos_token_id": 1,
        "is_encoder_decoder": true
    })
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(out) = args.next().map(PathBuf::from) else {
        eprintln!("usage: random_kobart OUT_DIR [SEED]");
        std::process::exit(2);
    };
    let seed: u64 = match args.next() {
        Some(s) => s.parse().map_err(kb_core::candle_core::Error::wrap)?,
        None => 0,
    };
    std::fs::create_dir_all(&out)?;
    let mut w = Weights {
        tensors: HashMap::new(),
        rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
    };
    w.normal("model.shared.weight", VOCAB, D_MODEL)?;
    // The padding token's embedding is zero, as `nn.Embedding(padding_idx=…)` initialises it.
    let shared = &w.tensors["model.shared.weight"];
    let zero = Tensor::zeros((1, D_MODEL), shared.dtype(), &Device::Cpu)?;
    let shared = Tensor::cat(
        &[
            &shared.narrow(0, 0, PAD)?,
            &zero,
            &shared.narrow(0, PAD + 1, VOCAB - PAD - 1)?,
        ],
        0,
    )?;
    w.tensors.insert("model.shared.weight".into(), shared);
    for stack in ["encoder", "decoder"] {
        let p = format!("model.{stack}");
        w.normal(
            &format!("{p}.embed_positions.weight"),
            POSITIONS + POSITION_OFFSET,
            D_MODEL,
        )?;
        w.layer_norm(&format!("{p}.layernorm_embedding"))?;
        for i in 0..LAYERS {
            let l = format!("{p}.layers.{i}");
            w.attention(&format!("{l}.self_attn"))?;
            w.layer_norm(&format!("{l}.self_attn_layer_norm"))?;
            if stack == "decoder" {
                w.attention(&format!("{l}.encoder_attn"))?;
                w.layer_norm(&format!("{l}.encoder_attn_layer_norm"))?;
            }
            w.linear(&format!("{l}.fc1"), FFN, D_MODEL)?;
            w.linear(&format!("{l}.fc2"), D_MODEL, FFN)?;
            w.layer_norm(&format!("{l}.final_layer_norm"))?;
        }
    }
    w.constant("final_logits_bias", 0.0, &[1, VOCAB])?;
    kb_core::candle_core::safetensors::save(&w.tensors, out.join("model.safetensors"))?;

    let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("JSON");
    std::fs::write(out.join("config.json"), json(&config_json()))?;
    let generation = serde_json::json!({
        "bos_token_id": 0,
        "decoder_start_token_id": 1,
        "eos_token_id": 1,
        "forced_eos_token_id": 1,
        "pad_token_id": PAD,
        "num_beams": 5,
        "max_length": 512
    });
    std::fs::write(out.join("generation_config.json"), json(&generation))?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shared_tokenizer = root.join("../shared/kobart-tokenizer/tokenizer.json");
    let fixture = root.join("crates/kb-core/tests/fixtures/tiny-kobart/tokenizer.json");
    let from_shared = shared_tokenizer.is_file();
    let tokenizer = if from_shared {
        shared_tokenizer
    } else {
        fixture
    };
    std::fs::copy(&tokenizer, out.join("tokenizer.json"))?;
    println!(
        "wrote {} (tokenizer from {})",
        out.display(),
        if from_shared {
            "shared KoBART"
        } else {
            "fixture"
        }
    );
    Ok(())
}
