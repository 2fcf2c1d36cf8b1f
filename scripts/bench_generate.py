#!/usr/bin/env python3
"""Generation benchmark: kb-core, transformers and CTranslate2, f32 and int8, on one CPU in one run.

    python scripts/bench_generate.py [--model DIR] [--threads 2] [--rounds 3] [--reps 2]
        [--engines kb,hf,ct2] [--dtypes f32,int8] [--kb-f32-kernels avx2,...] [--json PATH]

Engines (each in its own process, --threads threads, exactly --new-tokens new tokens: minimum
length = maximum length, so no search ends early):
  kb   kb-core through its bench harness (crates/kb-core/benches/generate.rs), built once with
       `cargo bench --no-run` and run directly; f32 = KB_BENCH_QUANTIZE=none, int8 = int8
       (RAYON_NUM_THREADS = --threads). --kb-f32-kernels avx2 (or portable, avx512) adds, after
       kb f32 with the kernel kb-core picks, kb f32 with that kernel forced (KB_F32_KERNEL), shown
       as dtype f32@avx2: on an AVX-512 CPU, does the AVX-512 kernel it picks win there?
  hf   transformers' BartForConditionalGeneration.generate; int8 =
       torch.ao.quantization.quantize_dynamic(model, {Linear}, qint8); torch.set_num_threads.
  ct2  CTranslate2 Translator.translate_batch on the model converted by ct2-transformers-converter
       (--quantization float32 / int8, cached in DIR.ct2-float32 / DIR.ct2-int8 next to the
       model); compute_type float32 / int8_float32, intra_threads = --threads, inter_threads 1.
All are fed the same token ids: the KoBART tokenizer's encoding of each query without special
tokens (what kb-core's encode_queries feeds the model; no `</s>` appended).

Measurements, per engine and dtype: greedy and beam 5 at batch 1 (ms per query, mean over --reps
x 4 queries after one warm-up query), and one batch of --batch (16) queries with beam 5 (queries
per second, mean over --reps batches). Rounds interleave the engines (round 1: kb f32, kb int8,
hf f32, hf int8, ct2 f32, ct2 int8; round 2: the same, ...) so drift hits all alike; the summary
gives the median and the range (min-max) over rounds, then the ratios the int8 work targets.

The machine (CPU model, SIMD flags, threads, load average) is printed first. Other work on the
machine is watched: a WARNING is printed when the 1-minute load average is above 0.5 at the
start, when other processes keep the CPUs busy in the second before a round, or when they used
CPU time during a measurement ("other CPU", in CPUs: machine busy time minus this benchmark's).

--model defaults to target/bench/random-kobart, a KoBART-v1-shaped model with random weights,
written by `cargo run --release -p kb-core --example random_kobart -- DIR` when missing.
`--rounds 0` only prepares (model, kb-core build, CTranslate2 conversions). Needs torch,
transformers, ctranslate2 (for hf/ct2) in the running Python. The converter's BART loader reads
config.normalize_before, which the model's config.json may lack (BART is post-norm): the
conversion then reads a linked copy of the folder whose config.json adds "normalize_before": false.
"""

import argparse
import importlib.metadata
import itertools
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The kb-core harness's queries (crates/kb-core/benches/generate.rs).
QUERIES = [
    "이사화물 통관예약을 하면 뭐가 좋나요?",
    "해외직구 물품의 면세한도는 얼마인가요?",
    "개인통관고유부호는 어디서 발급받나요?",
    "여행자 휴대품 신고는 어떻게 하나요?",
]
ENGINES = {"kb": "kb-core", "hf": "transformers", "ct2": "CTranslate2"}
ALIASES = {"kb-core": "kb", "transformers": "hf", "ctranslate2": "ct2"}
DTYPES = ("f32", "int8")
CT2_QUANT = {"f32": "float32", "int8": "int8"}
CT2_COMPUTE = {"f32": "float32", "int8": "int8_float32"}
FLAGS = ["avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16"]
LOAD_WARN = 0.5  # 1-minute load average, or CPUs busy with other work while idle
OTHER_WARN = 0.25  # CPUs used by other processes during a measurement
# Ratios of medians: (label, numerator, denominator, target); a side is (engine, dtype, metric).
RATIOS = [
    ("kb int8 greedy / hf f32 greedy", ("kb", "int8", "greedy"), ("hf", "f32", "greedy"), 0.35),
    ("kb int8 greedy / ct2 int8 greedy", ("kb", "int8", "greedy"), ("ct2", "int8", "greedy"), 0.8),
    ("kb int8 beam5 / ct2 int8 beam5", ("kb", "int8", "beam"), ("ct2", "int8", "beam"), 0.8),
    ("kb f32 greedy / hf f32 greedy", ("kb", "f32", "greedy"), ("hf", "f32", "greedy"), 0.8),
]


# --- machine and load --------------------------------------------------------------------------


def machine_info():
    cpu, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu == "unknown CPU":
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = FLAGS + sorted(f for f in flags if f.startswith("amx"))
    return {
        "cpu": cpu,
        "flags": [f for f in wanted if f in flags],
        "missing_flags": [f for f in FLAGS if f not in flags],
        "cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def versions():
    out = {}
    for pkg in ("torch", "transformers", "ctranslate2", "tokenizers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def print_machine(info, threads):
    print(f"# CPU: {info['cpu']}; {info['cpus']} CPUs ({info['cpus_available']} available to this "
          f"process), benchmark threads: {threads}", flush=True)
    missing = f" (absent: {' '.join(info['missing_flags'])})" if info["missing_flags"] else ""
    print(f"# flags: {' '.join(info['flags']) or '-'}{missing}", flush=True)
    la = info["loadavg"]
    print(f"# load average (1/5/15 min): {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}", flush=True)
    if la[0] > LOAD_WARN:
        print(f"WARNING: 1-minute load average {la[0]:.2f} > {LOAD_WARN}: other work is running; "
              "figures will be disturbed", flush=True)


def cpu_snapshot():
    """(time, machine busy CPU seconds, CPU seconds of this process and its finished children)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)  # incl. irq, steal
    ours = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        ours += ru.ru_utime + ru.ru_stime
    return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), ours


def other_cpus(a, b):
    """CPUs used, on average between two snapshots, by processes other than this benchmark."""
    wall = b[0] - a[0]
    return max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / wall if wall > 0 else 0.0


# --- workers (one process per engine run) ------------------------------------------------------


def encode(model_dir, prompts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    # No special tokens, as kb-core's encode_queries (Tokenizer::encode_batch(texts, false)).
    return tok, [tok.encode(q, add_special_tokens=False).ids for q in prompts]


def hf_generator(args):
    import torch
    import transformers
    from transformers import BartForConditionalGeneration

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    model = BartForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    info = {"torch_threads": torch.get_num_threads()}
    if args.dtype == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        info["quantized_engine"] = torch.backends.quantized.engine
    pad = model.config.pad_token_id
    n = args.new_tokens

    def gen(rows, beams):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        with torch.inference_mode():
            # max_length counts the decoder start token, as in kb-core's harness.
            out = model.generate(input_ids=ids, attention_mask=mask, num_beams=beams, do_sample=False,
                                 max_length=n + 1, min_length=n + 1)
        return out.shape[1] - 1

    return gen, info


def ct2_generator(args, tok):
    import ctranslate2

    ct2_dir = Path(args.ct2_dir)
    vocab = None
    for name in ("shared_vocabulary.json", "source_vocabulary.json"):
        if (ct2_dir / name).exists():
            vocab = json.loads((ct2_dir / name).read_text(encoding="utf-8"))
    if vocab is None:
        for name in ("shared_vocabulary.txt", "source_vocabulary.txt"):
            if (ct2_dir / name).exists():
                vocab = (ct2_dir / name).read_text(encoding="utf-8").split("\n")
    translator = ctranslate2.Translator(str(ct2_dir), device="cpu", compute_type=CT2_COMPUTE[args.dtype],
                                        intra_threads=args.threads, inter_threads=1)
    # The generation settings transformers and kb-core read from generation_config.json.
    extra = {}
    gen_cfg = Path(args.model) / "generation_config.json"
    cfg = json.loads(gen_cfg.read_text()) if gen_cfg.exists() else {}
    for key in ("no_repeat_ngram_size", "repetition_penalty", "length_penalty"):
        if cfg.get(key) is not None:
            extra[key] = cfg[key]
    n = args.new_tokens
    checked = set()

    def tokens(row):
        out = [tok.id_to_token(i) for i in row]  # = transformers' convert_ids_to_tokens
        if vocab is not None and tuple(row) not in checked:
            # CTranslate2 maps tokens back through its own vocabulary: same ids as the others?
            bad = [(i, t) for i, t in zip(row, out) if i >= len(vocab) or vocab[i] != t]
            if bad:
                raise SystemExit(f"CTranslate2's vocabulary disagrees with tokenizer.json at {bad[:5]}")
            checked.add(tuple(row))
        return out

    def gen(rows, beams):
        res = translator.translate_batch([tokens(r) for r in rows], beam_size=beams, max_decoding_length=n,
                                         min_decoding_length=n, return_scores=False, **extra)
        return len(res[0].hypotheses[0])

    return gen, {"compute_type": CT2_COMPUTE[args.dtype], "extra": extra}


def worker(args):
    prompts = read_prompts(args.prompts) if args.prompts else QUERIES
    tok, ids = encode(args.model, prompts)
    start = time.perf_counter()
    gen, info = hf_generator(args) if args.worker == "hf" else ct2_generator(args, tok)
    info["load_s"] = round(time.perf_counter() - start, 2)
    info["input_tokens"] = [len(r) for r in ids]
    n = args.new_tokens
    measure = set(args.measure.split(","))
    out = {}

    def check(got):
        if got != n:
            raise SystemExit(f"{args.worker} {args.dtype}: generated {got} tokens, not {n}")

    warmed = set()
    for beams, name in ((1, "greedy"), (args.beams, "beam")):
        if name not in measure:
            continue
        check(gen([ids[0]], beams))  # warm-up, as the kb-core harness
        warmed.add(beams)
        start = time.perf_counter()
        count = 0
        for _ in range(args.reps):
            for row in ids:
                check(gen([row], beams))
                count += 1
        out[name] = (time.perf_counter() - start) * 1000 / count
    if "batch" in measure:
        if args.beams not in warmed:
            check(gen([ids[0]], args.beams))
        many = list(itertools.islice(itertools.cycle(ids), args.batch))
        start = time.perf_counter()
        for _ in range(args.reps):
            check(gen(many, args.beams))
        out["batch"] = args.batch * args.reps / (time.perf_counter() - start)
    print(json.dumps({"results": out, "info": info}), flush=True)


# --- driver ------------------------------------------------------------------------------------


def read_prompts(path):
    """First tab-separated column of each non-empty line (the load generator's prompt files)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [ln.split("\t", 1)[0].strip() for ln in lines if ln.split("\t", 1)[0].strip()]


def ensure_model(model):
    if (model / "config.json").exists():
        return
    print(f"# writing a random KoBART-v1-shaped model to {model}", flush=True)
    subprocess.run(["cargo", "run", "--release", "-q", "-p", "kb-core", "--example", "random_kobart", "--",
                    str(model)], cwd=ROOT, check=True)


def build_kb_bench():
    """Builds the kb-core generate bench once; returns the path of its binary."""
    print("# building kb-core's generate bench (cargo bench --no-run)", flush=True)
    out = subprocess.run(["cargo", "bench", "--no-run", "-p", "kb-core", "--bench", "generate",
                          "--message-format=json"], cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)
    for line in out.stdout.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        target = msg.get("target", {})
        if (msg.get("reason") == "compiler-artifact" and target.get("name") == "generate"
                and "bench" in target.get("kind", []) and msg.get("executable")):
            return msg["executable"]
    raise SystemExit("cargo built no executable for kb-core's generate bench")


def converter():
    local = Path(sys.executable).parent / "ct2-transformers-converter"
    found = str(local) if local.exists() else shutil.which("ct2-transformers-converter")
    if not found:
        raise SystemExit("ct2-transformers-converter not found (pip install ctranslate2 transformers torch)")
    return found


def ensure_ct2(model, dtype):
    """The model converted by ct2-transformers-converter, cached next to it (redone when stale)."""
    out = model.parent / f"{model.name}.ct2-{CT2_QUANT[dtype]}"
    newest = max(p.stat().st_mtime for p in model.iterdir() if p.is_file())
    if (out / "model.bin").exists() and (out / "model.bin").stat().st_mtime >= newest:
        return out
    print(f"# converting the model for CTranslate2 ({CT2_QUANT[dtype]}) into {out}", flush=True)
    tmp = out.parent / (out.name + ".tmp")
    src = out.parent / (out.name + ".src")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(src, ignore_errors=True)
    source = model
    config = json.loads((model / "config.json").read_text())
    if "normalize_before" not in config:
        # The converter's BART loader reads config.normalize_before, which configs written by
        # recent transformers (and random_kobart) lack; BART is post-norm. Convert from a copy of
        # the folder (links to the same files) whose config.json says so; transformers ignores it.
        src.mkdir()
        for p in model.iterdir():
            if p.is_file() and p.name != "config.json":
                (src / p.name).symlink_to(p.resolve())
        (src / "config.json").write_text(json.dumps(dict(config, normalize_before=False), indent=2))
        source = src
    res = subprocess.run([converter(), "--model", str(source), "--output_dir", str(tmp), "--quantization",
                          CT2_QUANT[dtype], "--force"], capture_output=True, text=True)
    shutil.rmtree(src, ignore_errors=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"ct2-transformers-converter failed ({res.returncode})")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def run_kb(args, binary, dtype):
    # "f32@avx2": f32 with the f32 kernel forced.
    base, _, kernel = dtype.partition("@")
    env = dict(os.environ, KB_BENCH_MODEL=str(args.model), KB_BENCH_DTYPES="f32",
               KB_BENCH_QUANTIZE="none" if base == "f32" else "int8", KB_BENCH_REPS=str(args.reps),
               KB_BENCH_BATCH=str(args.batch), KB_BENCH_NEW_TOKENS=str(args.new_tokens),
               RAYON_NUM_THREADS=str(args.threads))
    if kernel:
        env["KB_F32_KERNEL"] = kernel
    res = subprocess.run([binary], cwd=ROOT / "crates" / "kb-core", env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"kb-core bench ({dtype}) failed ({res.returncode})")
    out, raw = {}, []
    for line in (res.stdout + "\n" + res.stderr).splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        raw.append(r)
        if "ms_per_query" in r:
            out["greedy" if r["beams"] == 1 else "beam"] = r["ms_per_query"]
        elif "ms_per_batch" in r and r["beams"] == 5:
            out["batch"] = r["batch"] * 1000 / r["ms_per_batch"]
        elif "ms_per_batch" in r and r["beams"] == 1:
            out["batch_greedy"] = r["batch"] * 1000 / r["ms_per_batch"]
    return out, {"harness": raw}


def run_python(args, engine, dtype, ct2_dirs):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", engine, "--dtype", dtype, "--model",
           str(args.model), "--threads", str(args.threads), "--reps", str(args.reps), "--batch", str(args.batch),
           "--beams", str(args.beams), "--new-tokens", str(args.new_tokens), "--measure", args.measure]
    if engine == "ct2":
        cmd += ["--ct2-dir", str(ct2_dirs[dtype])]
    if args.prompts:
        cmd += ["--prompts", args.prompts]
    t = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, TOKENIZERS_PARALLELISM="false")
    if engine == "ct2":
        env["CT2_VERBOSE"] = "1"  # its CPU / ISA lines
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"{ENGINES[engine]} {dtype} failed ({res.returncode})")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    if engine == "ct2":
        r["info"]["ct2_log"] = [ln.strip() for ln in res.stderr.splitlines() if "[info]" in ln][:8]
    return r["results"], r["info"]


def fmt(values, digits):
    if not values:
        return "n/a"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def summarize(args, configs, rows, measures):
    def values(engine, dtype, metric):
        return [r["results"][metric] for r in rows
                if r["engine"] == engine and r["dtype"] == dtype and metric in r["results"]]

    print()
    print(f"{args.new_tokens} new tokens, {args.threads} threads, {args.rounds} rounds; median (min–max) over rounds")
    print()
    cols = [("greedy", "greedy b1 ms/query", 1), ("beam", f"beam {args.beams} b1 ms/query", 1),
            ("batch", f"{args.batch}×beam {args.beams} queries/s", 2)]
    cols = [c for c in cols if c[0] in measures]
    print("| engine | dtype | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    summary = {}
    for engine, dtype in configs:
        cells = []
        for metric, _, digits in cols:
            v = values(engine, dtype, metric)
            cells.append(fmt(v, digits))
            if v:
                summary[f"{engine}/{dtype}/{metric}"] = {"median": statistics.median(v), "min": min(v), "max": max(v),
                                                         "values": v}
        print(f"| {ENGINES[engine]} | {dtype} | " + " | ".join(cells) + " |")

    ratios = []
    for label, num, den, target in RATIOS:
        a, b = values(*num), values(*den)
        if not a or not b:
            continue
        med = statistics.median(a) / statistics.median(b)
        # Paired by round: the ratio within each round.
        per_round = [x / y for x, y in zip(a, b)]
        ratios.append({"ratio": label, "median_ratio": med, "per_round": per_round, "target": target,
                       "met": med <= target})
    if ratios:
        print()
        print("| ratio (lower is better) | of medians | per round (min–max) | target | |")
        print("|---|---|---|---|---|")
        for r in ratios:
            pr = r["per_round"]
            print(f"| {r['ratio']} | {r['median_ratio']:.2f} | {min(pr):.2f}–{max(pr):.2f} | ≤ {r['target']} | "
                  f"{'met' if r['met'] else 'NOT met'} |")
    return summary, ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "target" / "bench" / "random-kobart"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="0: only build, write the model and convert it")
    ap.add_argument("--reps", type=int, default=2,
                    help="batch 1: REPS x 4 queries per measurement; batches: REPS batches")
    ap.add_argument("--engines", default="kb,hf,ct2", help="subset of kb,hf,ct2")
    ap.add_argument("--dtypes", default="f32,int8", help="subset of f32,int8")
    ap.add_argument("--batch", type=int, default=16, help="queries in the batched measurement")
    ap.add_argument("--beams", type=int, default=5, help="beams of the beam measurements (kb-core's harness: 5)")
    ap.add_argument("--new-tokens", type=int, default=16, help="tokens generated per query")
    ap.add_argument("--measure", default="greedy,beam,batch", help="subset of greedy,beam,batch (kb runs all)")
    ap.add_argument("--prompts", help="queries from this file (first column) instead of the harness's 4; not kb")
    ap.add_argument("--kb-f32-kernels", default="",
                    help="also measure kb f32 with each of these f32 kernels forced (portable, avx2, avx512)")
    ap.add_argument("--json", help="write all raw results here")
    ap.add_argument("--machine-info", action="store_true", help="print the machine header and exit")
    ap.add_argument("--worker", choices=["hf", "ct2"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=DTYPES, help=argparse.SUPPRESS)
    ap.add_argument("--ct2-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # On SIGTERM, unwind like Ctrl-C: subprocess.run then kills the running engine process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.worker:
        return worker(args)

    info = machine_info()
    print_machine(info, args.threads)
    if args.machine_info:
        return
    engines = [ALIASES.get(e.strip(), e.strip()) for e in args.engines.split(",") if e.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    measures = [m.strip() for m in args.measure.split(",") if m.strip()]
    for e in engines:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r} (kb, hf, ct2)")
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d!r} (f32, int8)")
    for m in measures:
        if m not in ("greedy", "beam", "batch"):
            ap.error(f"unknown measurement {m!r} (greedy, beam, batch)")
    if "kb" in engines and (args.beams != 5 or args.prompts):
        ap.error("kb-core's harness measures beam 5 on its own 4 queries: drop --beams/--prompts or kb")
    args.model = str(Path(args.model).resolve())
    model = Path(args.model)
    print(f"# versions: {json.dumps(versions())}", flush=True)

    ensure_model(model)
    binary = build_kb_bench() if "kb" in engines else None
    ct2_dirs = {d: ensure_ct2(model, d) for d in dtypes} if "ct2" in engines else {}
    configs = [(e, d) for e in engines for d in dtypes]
    kernels = [k.strip() for k in args.kb_f32_kernels.split(",") if k.strip()]
    for k in kernels:
        if k not in ("portable", "avx2", "avx512"):
            ap.error(f"unknown f32 kernel {k!r} (portable, avx2, avx512)")
    if kernels and ("kb", "f32") in configs:
        at = configs.index(("kb", "f32")) + 1
        configs[at:at] = [("kb", f"f32@{k}") for k in kernels]
    print(f"# model {model}; {args.new_tokens} new tokens; batch 1: {args.reps}×"
          f"{len(read_prompts(args.prompts)) if args.prompts else len(QUERIES)} queries; batched: {args.reps}×"
          f"{args.batch} queries, beam {args.beams}; {args.rounds} rounds of "
          + ", ".join(f"{e} {d}" for e, d in configs), flush=True)

    rows, round_load = [], []
    report = {"machine": info, "versions": versions(), "args": vars(args), "rows": rows, "round_load": round_load}
    printed_ct2_log = False
    started = time.monotonic()
    for rnd in range(1, args.rounds + 1):
        a = cpu_snapshot()
        time.sleep(1.0)
        idle_other = other_cpus(a, cpu_snapshot())
        la = os.getloadavg()
        round_load.append({"round": rnd, "loadavg": [round(x, 2) for x in la], "idle_other_cpus": idle_other})
        print(f"# round {rnd}/{args.rounds}: load average {la[0]:.2f} (includes this benchmark's own runs), "
              f"CPUs busy while idle {idle_other:.2f}", flush=True)
        if idle_other > LOAD_WARN:
            print(f"WARNING: round {rnd}: other processes keep {idle_other:.2f} CPUs busy; figures will be disturbed",
                  flush=True)
        for engine, dtype in configs:
            a = cpu_snapshot()
            if engine == "kb":
                results, extra = run_kb(args, binary, dtype)
            else:
                results, extra = run_python(args, engine, dtype, ct2_dirs)
            b = cpu_snapshot()
            other = other_cpus(a, b)
            rows.append({"round": rnd, "engine": engine, "dtype": dtype, "results": results, "info": extra,
                         "wall_s": round(b[0] - a[0], 2), "other_cpus": round(other, 3)})
            parts = []
            if "greedy" in results:
                parts.append(f"greedy {results['greedy']:.1f} ms")
            if "beam" in results:
                parts.append(f"beam {args.beams} {results['beam']:.1f} ms")
            if "batch" in results:
                parts.append(f"{args.batch}×beam {args.beams} {results['batch']:.2f} q/s")
            print(f"round {rnd} {ENGINES[engine]:>12} {dtype:<4}: " + ", ".join(parts)
                  + f"  ({b[0] - a[0]:.0f} s, other CPU {other:.2f})", flush=True)
            if other > OTHER_WARN:
                print(f"WARNING: other processes used {other:.2f} CPUs during round {rnd} {ENGINES[engine]} {dtype}",
                      flush=True)
            if engine == "ct2" and not printed_ct2_log and extra.get("ct2_log"):
                for ln in extra["ct2_log"]:
                    print(f"#   {ln}", flush=True)
                printed_ct2_log = True
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False))

    if not rows:
        print("# prepared (--rounds 0): nothing measured")
        return
    summary, ratios = summarize(args, configs, rows, measures)
    disturbed = [r for r in rows if r["other_cpus"] > OTHER_WARN]
    print(f"\n{len(rows)} measurements in {time.monotonic() - started:.0f} s", end="")
    print(f"; {len(disturbed)} disturbed by other work (WARNING above)" if disturbed else "")
    report.update(summary=summary, ratios=ratios)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False))
        print(f"raw results: {args.json}")


if __name__ == "__main__":
    main()
