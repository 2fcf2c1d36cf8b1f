#!/usr/bin/env python3
"""Checks an exported model folder with transformers against kb-extract on the same folder.

    python scripts/verify_export.py FOLDER [--queries data/test.tsv] [--n 20]

Loads FOLDER with BartForConditionalGeneration.from_pretrained and
PreTrainedTokenizerFast.from_pretrained, then for N queries compares:
  - token ids of the queries (tokenizer parity),
  - a beam-5 generation (settings from the folder's generation_config.json): token ids identical,
    sequence scores within 1e-4 — which also pins the logits along every beam,
  - teacher-forced logits of the generated sequences against kb-core's, through the scores above.
kb-extract (built with cargo) produces the Rust side. Exits non-zero on any mismatch.
"""

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder")
    ap.add_argument("--queries", default=str(ROOT / "data" / "test.tsv"))
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()

    import torch
    from transformers import BartForConditionalGeneration, PreTrainedTokenizerFast

    with open(args.queries, encoding="utf-8") as f:
        queries = [r["query"] for r in csv.DictReader(f, delimiter="\t")][: args.n]
    tok = PreTrainedTokenizerFast.from_pretrained(args.folder)
    model = BartForConditionalGeneration.from_pretrained(args.folder).eval()
    gen = model.generation_config
    print(f"transformers loaded {args.folder}: num_beams={gen.num_beams} max_length={gen.max_length} "
          f"eos={gen.eos_token_id} forced_eos={gen.forced_eos_token_id}")

    with tempfile.TemporaryDirectory() as tmp:
        qfile = Path(tmp) / "q.txt"
        qfile.write_text("\n".join(queries) + "\n", encoding="utf-8")
        out = Path(tmp) / "out.jsonl"
        subprocess.run(
            ["cargo", "run", "-q", "--release", "-p", "kb-extract", "--", "--model", args.folder,
             "--input", str(qfile), "--format", "jsonl", "--ids", "--scores", "--output", str(out),
             "--batch_size", "4"],
            cwd=ROOT, check=True,
        )
        ours = [json.loads(ln) for ln in out.read_text(encoding="utf-8").splitlines()]

    failures = 0
    max_score_diff = 0.0
    for q, o in zip(queries, ours):
        ids = tok.encode(q)
        with torch.no_grad():
            res = model.generate(input_ids=torch.tensor([ids]), return_dict_in_generate=True, output_scores=True)
        seq = res.sequences[0].tolist()[1:]
        if gen.num_beams > 1:
            length = int((res.beam_indices[0] != -1).sum())
            score = float(res.sequences_scores[0])
        else:
            length = next((i + 1 for i, t in enumerate(seq) if t in ([gen.eos_token_id] if isinstance(gen.eos_token_id, int) else gen.eos_token_id)), len(seq))
            score = None
        seq = seq[:length]
        text = tok.decode(seq, skip_special_tokens=True)
        ok = seq == o["ids"] and text == o["text"]
        if score is not None and o.get("score") is not None:
            d = abs(score - o["score"])
            max_score_diff = max(max_score_diff, d)
            ok = ok and d < 1e-4
        if not ok:
            failures += 1
            print(f"MISMATCH {q!r}\n  transformers {seq} {text!r} {score}\n  kb-extract   {o['ids']} {o['text']!r} {o.get('score')}")
    print(f"{len(queries) - failures}/{len(queries)} queries identical (token ids and text); "
          f"max beam score difference {max_score_diff:.2e}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
