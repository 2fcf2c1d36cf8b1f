#!/usr/bin/env python3
"""Generation benchmark: kb-core against transformers on the same CPU, in one run.

    python scripts/bench_generate.py [--model DIR] [--threads 2] [--reps 3]

Both generate exactly 16 new tokens (min_length = max_length = 17) for batch-1 queries, greedy
and beam 5, in f32 and bf16, on a model with KoBART-v1's shapes (made by
scripts/make_random_kobart.py if --model is not given). Prints ms per query and the ratio
kb-core / transformers (lower is better).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUERIES = [
    "이사화물 통관예약을 하면 뭐가 좋나요?",
    "해외직구 물품의 면세한도는 얼마인가요?",
    "개인통관고유부호는 어디서 발급받나요?",
    "여행자 휴대품 신고는 어떻게 하나요?",
]


def bench_transformers(model_dir, threads, reps, dtypes):
    import torch
    from transformers import BartForConditionalGeneration, PreTrainedTokenizerFast

    torch.set_num_threads(threads)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(model_dir) / "tokenizer.json"))
    results = []
    for dtype in dtypes:
        tdtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
        model = BartForConditionalGeneration.from_pretrained(model_dir, dtype=tdtype).eval()
        inputs = [torch.tensor([tok.encode(q)]) for q in QUERIES]
        for beams in (1, 5):
            kw = dict(num_beams=beams, max_length=17, min_length=17, eos_token_id=1, forced_eos_token_id=1)
            with torch.inference_mode():
                model.generate(input_ids=inputs[0], **kw)
                start = time.perf_counter()
                n = 0
                for _ in range(reps):
                    for ids in inputs:
                        out = model.generate(input_ids=ids, **kw)
                        assert out.shape[1] == 17
                        n += 1
            ms = (time.perf_counter() - start) * 1000 / n
            results.append({"impl": "transformers", "dtype": dtype, "beams": beams, "ms_per_query": round(ms, 1)})
            print(json.dumps(results[-1]), flush=True)
    return results


def bench_kb_core(model_dir, threads, reps, dtypes):
    env = dict(os.environ, KB_BENCH_MODEL=str(model_dir), KB_BENCH_REPS=str(reps),
               KB_BENCH_DTYPES=",".join(dtypes), RAYON_NUM_THREADS=str(threads))
    out = subprocess.run(["cargo", "bench", "-q", "-p", "kb-core", "--bench", "generate"],
                         cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    results = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    for r in results:
        print(json.dumps(r), flush=True)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/kobart-random")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtypes", default="f32,bf16")
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_kobart.py"), args.model], check=True)
    dtypes = args.dtypes.split(",")
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "unknown CPU")
    print(f"# {cpu}, {args.threads} threads, 16 new tokens, batch 1", flush=True)
    ours = bench_kb_core(args.model, args.threads, args.reps, dtypes)
    ref = bench_transformers(args.model, args.threads, args.reps, dtypes)
    print()
    print("| dtype | search | transformers ms/query | kb-core ms/query | ratio |")
    print("|---|---|---|---|---|")
    for r in ours:
        t = next(x for x in ref if x["dtype"] == r["dtype"] and x["beams"] == r["beams"])
        name = "greedy" if r["beams"] == 1 else f"beam {r['beams']}"
        print(f"| {r['dtype']} | {name} | {t['ms_per_query']} | {r['ms_per_query']} | {r['ms_per_query'] / t['ms_per_query']:.2f}× |")


if __name__ == "__main__":
    main()
