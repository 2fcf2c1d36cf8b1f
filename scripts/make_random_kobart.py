#!/usr/bin/env python3
"""Writes a model folder with KoBART-v1's shapes and random weights, for benchmarks.

    python scripts/make_random_kobart.py OUT_DIR [--seed 0]

KoBART-v1 (gogamza/kobart-base-v1): 30000 tokens, d_model 768, 6+6 layers, 16 heads, FFN 3072,
1026 positions, pad 3, eos 1, decoder start 1. The tokenizer is the real KoBART tokenizer from
../shared/kobart-tokenizer when present, else the test fixture's (which is smaller than the
vocabulary; that is fine for timing). Written with transformers' save_pretrained, so kb-core and
transformers load the very same files.
"""

import argparse
import shutil
from pathlib import Path

import torch
from transformers import BartConfig, BartForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    cfg = BartConfig(
        vocab_size=30000, max_position_embeddings=1026, d_model=768,
        encoder_layers=6, decoder_layers=6, encoder_attention_heads=16, decoder_attention_heads=16,
        encoder_ffn_dim=3072, decoder_ffn_dim=3072, activation_function="gelu",
        dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, scale_embedding=False,
        pad_token_id=3, bos_token_id=0, eos_token_id=1, decoder_start_token_id=1, forced_eos_token_id=1,
    )
    model = BartForConditionalGeneration(cfg).eval()
    model.generation_config.num_beams = 5
    model.generation_config.max_length = 512
    model.save_pretrained(str(out), safe_serialization=True)
    shared = ROOT.parent / "shared" / "kobart-tokenizer" / "tokenizer.json"
    fixture = ROOT / "crates" / "kb-core" / "tests" / "fixtures" / "tiny-kobart" / "tokenizer.json"
    shutil.copyfile(shared if shared.exists() else fixture, out / "tokenizer.json")
    print(f"wrote {out} (tokenizer from {'shared KoBART' if shared.exists() else 'fixture'})")


if __name__ == "__main__":
    main()
