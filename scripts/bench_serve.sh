#!/usr/bin/env bash
# Load benchmark: kb-serve (f32, and with --quantize int8) against the reference Flask server
# (scripts/reference_server.py, what the original inf_server.py did), next to CTranslate2's batched
# throughput, on the same random KoBART-v1-shaped model, CPU and prompts, one after the other in
# the same run.
#
# For each server: a single client for SINGLE_DURATION seconds (single-request latency), then
# CLIENTS concurrent clients for DURATION seconds, all on POST /keyword_extract with beam BEAMS
# and max_length MAX_LENGTH; reported: requests/s, p50/p99 latency, errors, and the server's RSS
# when idle after loading, the largest RSS sampled under load, and the peak (VmHWM, loading included).
# kb-serve runs once per QUANTIZE entry ("none int8": kb-serve and kb-serve-int8). A parity check
# compares each kb-serve's answers with the reference's for a few prompts. The "other CPU" column
# is the share of the machine's CPU used by other processes during each phase: figures taken while
# it is well above 0% are disturbed (the script warns; the machine's CPU, SIMD flags and load
# average are printed first, with a warning when the load average says other work is running).
#
# CTranslate2 line: scripts/bench_generate.py's CTranslate2 engine (the model converted once by
# ct2-transformers-converter, cached next to it) runs translate_batch on MAX_BATCH_SIZE prompts at
# a time (the same prompts), beam BEAMS, exactly MAX_LENGTH-1 new tokens, THREADS intra threads,
# for each of CT2_DTYPES; its queries/s is printed next to kb-serve's requests/s under CLIENTS
# clients (kb-serve batches concurrent requests up to MAX_BATCH_SIZE).
#
#   scripts/bench_serve.sh                      # 16 clients, 30 s, beam 5, max_length 32
#   DURATION=15 SINGLE_DURATION=10 scripts/bench_serve.sh
#   QUANTIZE=int8 SKIP_REFERENCE=1 scripts/bench_serve.sh
#
# Environment: DURATION, SINGLE_DURATION, CLIENTS, BEAMS, MAX_LENGTH, DTYPE (kb-serve),
# QUANTIZE (kb-serve configurations, default "none int8"), THREADS (kb-serve's RAYON_NUM_THREADS,
# the reference's torch threads, CTranslate2's intra threads; default: physical cores),
# MAX_BATCH_SIZE, MAX_WAIT_MS (kb-serve), PYTHON (with torch, transformers, flask, ctranslate2),
# MODEL_DIR (default: target/bench/random-kobart, created if missing), OUT (results folder),
# CARGO_TARGET_DIR, SKIP_REFERENCE=1, SKIP_CT2=1, CT2_DTYPES (default "f32 int8"), CT2_REPS
# (batches per CTranslate2 measurement, default 3).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DURATION=${DURATION:-30}
SINGLE_DURATION=${SINGLE_DURATION:-10}
CLIENTS=${CLIENTS:-16}
BEAMS=${BEAMS:-5}
MAX_LENGTH=${MAX_LENGTH:-32}
DTYPE=${DTYPE:-f32}
QUANTIZE=${QUANTIZE:-none int8}
# Default threads: physical cores (candle's and torch's own default), else all CPUs.
PHYSICAL=$(lscpu -p=Core,Socket 2>/dev/null | grep -v '^#' | sort -u | wc -l || true)
THREADS=${THREADS:-$(( PHYSICAL > 0 ? PHYSICAL : $(nproc) ))}
CT2_DTYPES=${CT2_DTYPES:-f32 int8}
CT2_REPS=${CT2_REPS:-3}
MAX_BATCH_SIZE=${MAX_BATCH_SIZE:-16}
MAX_WAIT_MS=${MAX_WAIT_MS:-5}
PYTHON=${PYTHON:-/work/pyenv/bin/python}
OUT=${OUT:-$ROOT/target/bench}
MODEL_DIR=${MODEL_DIR:-$OUT/random-kobart}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
PROMPTS=$ROOT/scripts/fixture_corpus.txt
mkdir -p "$OUT"

log() { echo "[bench] $*" >&2; }

# --- machine ------------------------------------------------------------------------------
"$PYTHON" "$ROOT/scripts/bench_generate.py" --machine-info --threads "$THREADS"

# --- model -------------------------------------------------------------------------------
if [[ ! -f $MODEL_DIR/model.safetensors ]]; then
    log "writing a random KoBART-v1-shaped model to $MODEL_DIR"
    (cd "$ROOT" && cargo run --release -q -p kb-core --example random_kobart -- "$MODEL_DIR")
fi

# --- builds --------------------------------------------------------------------------------
log "building kb-serve and the load generator (release)"
(cd "$ROOT" && cargo build --release -q -p kb-serve --bin kb-serve --example loadgen)
SERVE=$CARGO_TARGET_DIR/release/kb-serve
LOADGEN=$CARGO_TARGET_DIR/release/examples/loadgen

PID=""
cleanup() { [[ -n $PID ]] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null; true; }
trap cleanup EXIT

rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

sample_rss() { # PID SECONDS -> largest VmRSS seen (kB), sampling every 0.2 s
    local max=0 v end=$((SECONDS + $2))
    while ((SECONDS < end)) && kill -0 "$1" 2>/dev/null; do
        v=$(rss_kb "$1"); ((v > max)) && max=$v
        sleep 0.2
    done
    echo "$max"
}

free_port() { "$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_http() { # URL, seconds
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        curl -fs -o /dev/null "$1" && return 0
        kill -0 "$PID" 2>/dev/null || { log "server died"; return 1; }
        sleep 0.1
    done
    log "timeout waiting for $1"; return 1
}

ask() { # BASE PROMPT -> result string (sent without a Content-Type, like the original client)
    curl -fs -X POST "$1/keyword_extract" -H 'Content-Type:' --data-binary "$("$PYTHON" -c 'import json,sys; print(json.dumps({"prompt": sys.argv[1]}))' "$2")" \
        | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["result"])'
}

# CPU time in clock ticks: busy time of the whole machine, and user+system time of one process.
cpu_busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
cpu_of() { awk '{sub(/^.*\) /, ""); print $12 + $13}' "/proc/$1/stat" 2>/dev/null || echo 0; }

loadgen() { # OUT_JSON ARGS...: runs the load generator and records the share of the machine's
    # CPU that processes other than the server and the load generator used meanwhile (> 0 means
    # the figures are disturbed by other work on the machine).
    local out=$1 busy0 srv0 lg start
    shift
    busy0=$(cpu_busy); srv0=$(cpu_of "$PID"); start=$(date +%s.%N)
    "$LOADGEN" "$@" >"$out" &
    lg=$!
    local lgcpu=0 v
    while kill -0 "$lg" 2>/dev/null; do v=$(cpu_of "$lg"); ((v > lgcpu)) && lgcpu=$v; sleep 0.2; done
    wait "$lg"
    "$PYTHON" - "$out" "$busy0" "$(cpu_busy)" "$srv0" "$(cpu_of "$PID")" "$lgcpu" "$start" "$(date +%s.%N)" "$(getconf CLK_TCK)" "$(nproc)" <<'PY'
import json, sys
path, b0, b1, s0, s1, lg, t0, t1, hz, n = sys.argv[1:]
r = json.load(open(path))
other = (float(b1) - float(b0)) - (float(s1) - float(s0)) - float(lg)
r["other_cpu_share"] = max(0.0, other / (float(hz) * int(n) * (float(t1) - float(t0))))
json.dump(r, open(path, "w"))
PY
}

run_load() { # NAME BASE
    local name=$1 base=$2 idle load_max
    idle=$(rss_kb "$PID")
    log "$name: 1 client for ${SINGLE_DURATION}s"
    loadgen "$OUT/$name-single.json" --url "$base" --clients 1 --duration "$SINGLE_DURATION" --prompts "$PROMPTS" --label "$name-single"
    log "$name: $CLIENTS clients for ${DURATION}s"
    sample_rss "$PID" "$DURATION" >"$OUT/$name-rss-samples" &
    local sampler=$!
    loadgen "$OUT/$name-load.json" --url "$base" --clients "$CLIENTS" --duration "$DURATION" --prompts "$PROMPTS" --label "$name-load"
    wait "$sampler"
    load_max=$(cat "$OUT/$name-rss-samples")
    awk -v idle="$idle" -v load="$load_max" '/VmHWM/ {p=$2} END {printf "{\"idle_rss_mb\": %.0f, \"load_rss_mb\": %.0f, \"peak_rss_mb\": %.0f}", idle/1024, load/1024, p/1024}' "/proc/$PID/status" >"$OUT/$name-rss.json"
}

PARITY_PROMPTS=$(head -n 5 "$PROMPTS" | cut -f1)

# --- kb-serve, once per QUANTIZE entry --------------------------------------------------------
SERVERS=()
for q in $QUANTIZE; do
    name=kb-serve
    [[ $q != none ]] && name=kb-serve-$q
    SERVERS+=("$name")
    log "starting $name (--quantize $q, $THREADS threads)"
    RAYON_NUM_THREADS=$THREADS "$SERVE" --model "$MODEL_DIR" --port 0 --num_beams "$BEAMS" \
        --max_length "$MAX_LENGTH" --dtype "$DTYPE" --quantize "$q" --max_batch_size "$MAX_BATCH_SIZE" \
        --max_wait_ms "$MAX_WAIT_MS" >"$OUT/$name.stdout" 2>"$OUT/$name.log" &
    PID=$!
    for _ in $(seq 600); do grep -q 'listening on' "$OUT/$name.stdout" 2>/dev/null && break; sleep 0.1; done
    BASE=$(sed -n 's/^listening on //p' "$OUT/$name.stdout")
    wait_http "$BASE/ready" 300
    : >"$OUT/$name-answers.txt"
    while IFS= read -r p; do ask "$BASE" "$p" >>"$OUT/$name-answers.txt"; done <<<"$PARITY_PROMPTS"
    run_load "$name" "$BASE"
    curl -fs "$BASE/metrics" >"$OUT/$name-metrics.txt" || true
    kill -TERM "$PID"; wait "$PID"; log "$name exited with $?"; PID=""
done

# --- CTranslate2: batched throughput on the same prompts ------------------------------------------
rm -f "$OUT/ct2.json"
if [[ ${SKIP_CT2:-0} != 1 ]]; then
    log "CTranslate2: translate_batch($MAX_BATCH_SIZE), beam $BEAMS, $((MAX_LENGTH - 1)) new tokens, $CT2_REPS batches"
    "$PYTHON" "$ROOT/scripts/bench_generate.py" --model "$MODEL_DIR" --engines ct2 --dtypes "${CT2_DTYPES// /,}" \
        --measure batch --batch "$MAX_BATCH_SIZE" --beams "$BEAMS" --new-tokens "$((MAX_LENGTH - 1))" \
        --threads "$THREADS" --rounds 1 --reps "$CT2_REPS" --prompts "$PROMPTS" --json "$OUT/ct2.json" >&2
fi

# --- reference -----------------------------------------------------------------------------
if [[ ${SKIP_REFERENCE:-0} != 1 ]]; then
    PORT=$(free_port)
    log "starting the reference server on port $PORT ($THREADS torch threads)"
    "$PYTHON" "$ROOT/scripts/reference_server.py" --model "$MODEL_DIR" --port "$PORT" --threads "$THREADS" \
        --num_beams "$BEAMS" --max_length "$MAX_LENGTH" >"$OUT/reference.log" 2>&1 &
    PID=$!
    REF=http://127.0.0.1:$PORT
    wait_http "$REF/health" 300
    : >"$OUT/reference-answers.txt"
    while IFS= read -r p; do ask "$REF" "$p" >>"$OUT/reference-answers.txt"; done <<<"$PARITY_PROMPTS"
    run_load reference "$REF"
    kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
    SERVERS+=(reference)
fi

# --- report --------------------------------------------------------------------------------
"$PYTHON" - "$OUT" "$CLIENTS" "$DURATION" "$SINGLE_DURATION" "$BEAMS" "$MAX_LENGTH" "$DTYPE" "$THREADS" \
    "$MAX_BATCH_SIZE" "${SERVERS[@]}" <<'PY'
import json, os, sys
out, clients, duration, single, beams, max_length, dtype, threads, max_batch, *servers = sys.argv[1:]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
rows = []
for name in servers:
    s, l, r = load(f"{name}-single.json"), load(f"{name}-load.json"), load(f"{name}-rss.json")
    if not l:
        continue
    rows.append((name, s, l, r))
print(f"\nPOST /keyword_extract, beam {beams}, max_length {max_length}, kb-serve dtype {dtype}, "
      f"{os.cpu_count()} CPUs, {threads} threads; single client {single}s, then {clients} clients {duration}s\n")
hdr = (f"| server | 1 client: req/s | p50 (ms) | {clients} clients: req/s | done | p50 (ms) | p99 (ms) | "
       f"p99/p50 | p99/1-client p50 | errors | RSS idle / under load / VmHWM (MiB) | other CPU |")
print(hdr)
print("|" + "---|" * (hdr.count("|") - 1))
nan = float("nan")
for name, s, l, r in rows:
    sp50 = s["p50_ms"] if s and s["p50_ms"] is not None else nan
    p50 = l["p50_ms"] if l["p50_ms"] is not None else nan
    p99 = l["p99_ms"] if l["p99_ms"] is not None else nan
    print(f"| {name} | {s['rps'] if s else nan:.3f} | {sp50:.0f} | {l['rps']:.3f} | {l['ok']} | {p50:.0f} | {p99:.0f} | "
          f"{p99 / p50:.2f} | {p99 / sp50:.2f} | {l['errors']} | "
          f"{r['idle_rss_mb']:.0f} / {r['load_rss_mb']:.0f} / {r['peak_rss_mb']:.0f} | "
          f"{100 * (s or {}).get('other_cpu_share', nan):.0f}% / {100 * l.get('other_cpu_share', nan):.0f}% |")
by_name = {name: (l, r) for name, _, l, r in rows}
kb = [name for name, *_ in rows if name.startswith("kb-serve")]
if kb:
    print("\nkb-serve peak memory (VmHWM): " + ", ".join(f"{n} {by_name[n][1]['peak_rss_mb']:.0f} MiB" for n in kb))
ref = by_name.get("reference")
if ref and ref[0]["rps"] > 0:
    for n in kb:
        print(f"throughput: {n} {by_name[n][0]['rps'] / ref[0]['rps']:.1f}x the reference")
ct2 = load("ct2.json")
if ct2:
    print(f"\nCTranslate2 translate_batch({max_batch}), beam {beams}, exactly {int(max_length) - 1} new tokens "
          f"(kb-serve: at most that many), same prompts, {threads} threads; vs kb-serve under {clients} clients:")
    for row in ct2["rows"]:
        qps = row["results"].get("batch")
        if qps is None:
            continue
        line = f"  CTranslate2 {row['dtype']}: {qps:.3f} queries/s"
        twin = "kb-serve" if row["dtype"] == "f32" else f"kb-serve-{row['dtype']}"
        if twin in by_name and qps > 0:
            line += f"   | {twin}: {by_name[twin][0]['rps']:.3f} req/s ({by_name[twin][0]['rps'] / qps:.2f}x)"
        if row["other_cpus"] > 0.25:
            line += f"   WARNING: other processes used {row['other_cpus']:.2f} CPUs meanwhile"
        print(line)
if ref:
    b = open(os.path.join(out, "reference-answers.txt")).read().splitlines()
    for n in kb:
        a = open(os.path.join(out, f"{n}-answers.txt")).read().splitlines()
        same = sum(x == y for x, y in zip(a, b))
        print(f"parity: {same}/{len(a)} prompts answered identically by {n} and the reference")
for n in kb:
    metrics = os.path.join(out, f"{n}-metrics.txt")
    if not os.path.exists(metrics):
        continue
    m = {}
    for line in open(metrics):
        if line.startswith("kb_batch_size_") and not line.startswith("kb_batch_size_bucket"):
            k, v = line.split()
            m[k] = float(v)
    if m.get("kb_batch_size_count"):
        print(f"{n} batches: {m['kb_batch_size_count']:.0f}, mean size {m['kb_batch_size_sum'] / m['kb_batch_size_count']:.1f} queries")
for name, s, l, _ in rows:
    for phase, r in [("1 client", s), (f"{clients} clients", l)]:
        if r and r.get("other_cpu_share", 0) > 0.05:
            print(f"WARNING: other processes used {100 * r['other_cpu_share']:.0f}% of the CPU during {name}'s {phase} phase")
for name, _, l, _ in rows:
    if l["error_samples"]:
        print(f"{name} errors: {l['error_samples']}")
PY
