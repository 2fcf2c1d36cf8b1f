#!/usr/bin/env python3
"""Training benchmark: kb-core against PyTorch on the same CPU, in one run.

    python scripts/bench_train.py [--model DIR] [--threads 2] [--steps 5] [--epoch]
                                  [--device cpu|cuda] [--batch 8] [--precision 32|bf16]
                                  [--bench-bin PATH]

One optimizer step (forward, backward, clip_grad_norm_ 1.0, AdamW; the mean of --steps steps after
two warm-up steps, on both sides) on the first 8 rows of
data/train.tsv at KoBART-v1's shapes (model from scripts/make_random_kobart.py), both
implementations padding the batch to its longest row. With --epoch, also a whole epoch over
data/train.tsv: kb-core's epoch (rows padded per batch, length bucketing) against the original
recipe's (every row padded to max_len 512), both extrapolated from timed steps (an evenly spaced
sample of kb-core's batches; pad-to-512 steps all cost the same) because whole epochs at KoBART-v1
shapes take too long on a 2-core CPU.

With --device cuda (a CUDA build of the bench, e.g. from scripts/build_cuda.sh, given with
--bench-bin), both run on the GPU and the peak GPU memory each process used is reported too
(nvidia-smi's figure, CUDA context included, above the idle baseline); --precision bf16 runs
PyTorch under bf16 autocast and kb-core with bf16 compute and f32 master weights.
"""

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rows():
    with open(ROOT / "data" / "train.tsv", encoding="utf-8") as f:
        return [(r["query"], r["keyword"]) for r in csv.DictReader(f, delimiter="\t")]


def torch_batch(tok, pairs, pad_to=None):
    import torch

    enc = [tok.encode(q)[:512] for q, _ in pairs]
    lab = [(tok.encode(k) + [1])[:512] for _, k in pairs]
    dec = [[1] + ln[:-1] for ln in lab]
    def pad(seqs, value, width):
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs])
    we = pad_to or max(map(len, enc))
    wd = pad_to or max(map(len, dec))
    ids, dec_ids, labels = pad(enc, 3, we), pad(dec, 3, wd), pad(lab, -100, wd)
    return dict(input_ids=ids, attention_mask=(ids != 3).long(), decoder_input_ids=dec_ids,
                decoder_attention_mask=(dec_ids != 3).long(), labels=labels)


class GpuMemoryPeak:
    """Polls nvidia-smi while a benchmark runs; `peak_mib` is the most memory in use above the
    level seen before it started."""

    def __init__(self, enabled):
        self.enabled, self.peak_mib, self._stop = enabled, None, threading.Event()

    @staticmethod
    def used_mib():
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout
        return int(out.split()[0])

    def __enter__(self):
        if self.enabled:
            self.base, self.peak = self.used_mib(), 0
            def poll():
                while not self._stop.is_set():
                    self.peak = max(self.peak, self.used_mib())
                    time.sleep(0.05)
            self.thread = threading.Thread(target=poll, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self.thread.join()
            self.peak_mib = max(self.peak, self.used_mib()) - self.base


def bench_torch(model_dir, threads, steps, epoch, device="cpu", batch_size=8, precision="32"):
    import contextlib
    import torch
    from transformers import BartForConditionalGeneration, PreTrainedTokenizerFast

    torch.set_num_threads(threads)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(model_dir) / "tokenizer.json"))
    model = BartForConditionalGeneration.from_pretrained(model_dir).to(device).train()
    def sync():
        if device != "cpu":
            torch.cuda.synchronize()
    def autocast():
        if precision == "bf16":
            return torch.autocast(device_type="cuda" if device != "cpu" else "cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()
    no_decay = ["bias", "LayerNorm.bias", "LayerNorm.weight"]
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=3e-5)
    data = rows()

    def step(batch):
        opt.zero_grad()
        with autocast():
            out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    first = {k: v.to(device) for k, v in torch_batch(tok, data[:batch_size]).items()}
    for _ in range(2):  # warm-up, as on kb-core's side
        step(first)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step(first)
    sync()
    secs = time.perf_counter() - start
    tokens = int(first["attention_mask"].sum() + first["decoder_attention_mask"].sum()) * steps
    res = [{"impl": "pytorch", "what": "step", "ms_per_step": round(secs * 1000 / steps, 1), "tokens_per_s": round(tokens / secs, 1)}]
    print(json.dumps(res[-1]), flush=True)
    if epoch:
        padded = {k: v.to(device) for k, v in torch_batch(tok, data[:8], pad_to=512).items()}
        n = 2
        step(padded)
        start = time.perf_counter()
        for _ in range(n):
            step(padded)
        sync()
        per = (time.perf_counter() - start) / n
        batches = math.ceil(len(data) / 8)
        res.append({"impl": "pytorch-pad512", "what": "epoch", "rows": len(data), "batches": batches,
                    "seconds": round(per * batches, 1), "ms_per_step": round(per * 1000, 1), "extrapolated_from_steps": n})
        print(json.dumps(res[-1]), flush=True)
    return res


def bench_kb_core(model_dir, threads, steps, epoch, device="cpu", batch_size=8, precision="32", bench_bin=None):
    env = dict(os.environ, KB_BENCH_MODEL=str(model_dir), KB_BENCH_STEPS=str(steps),
               KB_BENCH_EPOCH="1" if epoch else "0", RAYON_NUM_THREADS=str(threads),
               KB_BENCH_DEVICE="cuda:0" if device != "cpu" else "cpu", KB_BENCH_BATCH=str(batch_size),
               KB_BENCH_PRECISION=precision)
    cmd = [bench_bin] if bench_bin else ["cargo", "bench", "-q", "-p", "kb-core", "--features", "train", "--bench", "train_step"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"kb-core bench failed ({out.returncode}):\n{out.stderr[-3000:]}")
    res = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    for r in res:
        print(json.dumps(r), flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/kobart-random")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--epoch", action="store_true")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--precision", choices=["32", "bf16"], default="32")
    ap.add_argument("--bench-bin", help="a built train_step bench binary instead of `cargo bench`")
    args = ap.parse_args()
    if not (Path(args.model) / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_random_kobart.py"), args.model], check=True)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "unknown CPU")
    where = cpu
    if args.device == "cuda":
        where = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                               capture_output=True, text=True).stdout.strip() or "CUDA GPU"
    print(f"# {where}, {args.threads} CPU threads, KoBART-v1 shapes, batch {args.batch}, precision {args.precision}", flush=True)
    gpu = args.device == "cuda"
    with GpuMemoryPeak(gpu) as mem_ours:
        ours = bench_kb_core(args.model, args.threads, args.steps, args.epoch and not gpu, args.device,
                             args.batch, args.precision, args.bench_bin)
    with GpuMemoryPeak(gpu) as mem_ref:
        ref = bench_torch(args.model, args.threads, args.steps, args.epoch, args.device, args.batch, args.precision)
    o = next(r for r in ours if r["what"] == "step")
    t = next(r for r in ref if r["what"] == "step")
    print()
    print("| measurement | PyTorch | kb-core | ratio |")
    print("|---|---|---|---|")
    print(f"| one step, batch {args.batch} (ms) | {t['ms_per_step']} | {o['ms_per_step']} | {o['ms_per_step'] / t['ms_per_step']:.2f}× |")
    print(f"| tokens/s | {t['tokens_per_s']} | {o['tokens_per_s']} | {o['tokens_per_s'] / t['tokens_per_s']:.2f}× |")
    if gpu:
        print(f"| peak GPU memory of the process (MiB, incl. CUDA context) | {mem_ref.peak_mib} | {mem_ours.peak_mib} | {mem_ours.peak_mib / max(mem_ref.peak_mib, 1):.2f}× |")
    if args.epoch and not gpu:
        oe = next(r for r in ours if r["what"] == "epoch")
        te = next(r for r in ref if r["what"] == "epoch")
        print(f"| epoch over data/train.tsv, batch 8 (s): original pad-to-512 (PyTorch) vs ours (kb-core) | {te['seconds']} (from {te['extrapolated_from_steps']} steps) | {oe['seconds']} (from {oe['extrapolated_from_steps']} steps) | {te['seconds'] / oe['seconds']:.1f}× faster |")


if __name__ == "__main__":
    main()
