#!/usr/bin/env bash
# The CUDA proofs, run on a GPU machine with binaries from scripts/build_cuda.sh (and the
# train_step bench built with --features cuda):
#
#   scripts/gpu_check.sh BIN_DIR OUT_DIR
#
# 1. kb-core's parity tests against transformers' goldens on the GPU (KB_TEST_DEVICE=cuda:0):
#    logits, generation (identical ids), AdamW training steps; the one-rank NCCL test.
# 2. kb-train on the GPU: the quickstart recipe (f32, then bf16), and the error when more GPUs
#    are asked for than exist (must fail cleanly, not hang).
# 3. Training speed and peak GPU memory at KoBART-v1 shapes, batch 8, next to PyTorch on the same
#    GPU (scripts/bench_train.py --device cuda), f32 and bf16.
# 4. kb-serve on the GPU under 16 concurrent clients (beam 5): requests/s and the process's GPU
#    memory (nvidia-smi), the figure the original served at ~4 GB.
#
# Needs: the NVIDIA driver, python3 with torch + transformers (for the random KoBART-shaped model
# and the PyTorch side), and CUDA 13 cuBLAS/cuRAND/NVRTC/NCCL libraries somewhere under /usr or
# /opt (e.g. PyTorch's pip wheels); they are put on LD_LIBRARY_PATH.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export RUST_LIB_BACKTRACE=0 RUST_BACKTRACE=0
BIN=$(realpath "${1:?usage: scripts/gpu_check.sh BIN_DIR OUT_DIR}")
OUT=$(realpath -m "${2:?usage: scripts/gpu_check.sh BIN_DIR OUT_DIR}")
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
exec > >(tee "$LOG") 2>&1
step() { echo; echo "== $* ($(date +%T))"; }
# SECTIONS="2 3" runs only those sections (default: all).
want() { [[ " ${SECTIONS:-1 2 3 4 5} " == *" $1 "* ]]; }

step "GPU"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

step "CUDA libraries"
for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libnccl.so.2; do
    found=$(find /usr /opt /lib /lib64 -name "$lib" 2>/dev/null | head -1)
    if [ -z "$found" ]; then
        echo "missing $lib"
        continue
    fi
    echo "$lib: $found"
    LD_LIBRARY_PATH=$(dirname "$found")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
done
export LD_LIBRARY_PATH

# The test executables find their fixtures through the path they were built in.
built_in=$(grep -a -o '/[[:alnum:]/._-]*/crates/kb-core' "$BIN/parity" | head -1)
root_then=${built_in%/crates/kb-core}
if [ -n "$root_then" ] && [ ! -e "$root_then" ]; then
    mkdir -p "$(dirname "$root_then")" && ln -s "$PWD" "$root_then"
    echo "linked $root_then -> $PWD"
fi

if want 1; then
step "1. parity with transformers on cuda:0"
for t in parity generation_parity training_golden; do
    KB_TEST_DEVICE=cuda:0 "$BIN/$t" --nocapture 2>&1 | grep -E 'diff|test |result|panicked|error' || true
done
"$BIN/kb-core-lib" single_rank_nccl --nocapture 2>&1 | grep -E 'test |result|skipped|panicked' || true

fi

if want 2; then
step "2. kb-train on the GPU (quickstart recipe, 4 epochs)"
RUN=/tmp/kb-gpu-run
rm -rf "$RUN" "$RUN-bf16"
t0=$SECONDS
"$BIN/kb-train" --config configs/quickstart-cpu.toml --accelerator gpu --max_epochs 4 \
    --checkpoint "$RUN" >"$OUT/train-f32.log" 2>&1
echo "exit status: $?"; grep -v '^ *[0-9]*: ' "$OUT/train-f32.log" | tail -12
echo "wall: $((SECONDS - t0)) s"
cp "$RUN/metrics.jsonl" "$OUT/metrics-f32.jsonl" 2>/dev/null
"$BIN/kb-extract" --model "$RUN/model_chp/last" --device cuda:0 --num_beams 5 \
    "이사화물 통관예약을 하면 뭐가 좋나요?" "해외직구 면세한도는 얼마인가요?" 2>&1 | tail -3
step "2b. bf16 mixed precision"
"$BIN/kb-train" --config configs/quickstart-cpu.toml --accelerator gpu --max_epochs 4 --precision bf16 \
    --checkpoint "$RUN-bf16" >"$OUT/train-bf16.log" 2>&1
echo "exit status: $?"; grep -v '^ *[0-9]*: ' "$OUT/train-bf16.log" | tail -8
step "2c. more GPUs than the machine has: a clean error, no hang"
timeout 120 "$BIN/kb-train" --config configs/quickstart-cpu.toml --accelerator gpu --num_gpus 2 \
    --max_steps 2 --checkpoint /tmp/kb-gpu-two 2>&1 | grep -v '^ *[0-9]*: ' | tail -3
echo "exit status: ${PIPESTATUS[0]}"

fi

MODEL=/tmp/kobart-random
if want 3 || want 4 || want 5; then
    python3 scripts/make_random_kobart.py "$MODEL" 2>&1 | tail -1
fi
if want 3; then
step "3. training step at KoBART-v1 shapes, batch 8, vs PyTorch on the same GPU"
python3 scripts/bench_train.py --device cuda --model "$MODEL" --steps 20 --bench-bin "$BIN/train_step" 2>&1 | tail -6
python3 scripts/bench_train.py --device cuda --model "$MODEL" --steps 20 --precision bf16 --bench-bin "$BIN/train_step" 2>&1 | tail -6

fi

serve_check() { # DTYPE
    local dtype=$1
    step "4. kb-serve on cuda:0 ($dtype), 16 concurrent clients, beam 5, 20 s"
    "$BIN/kb-serve" --model "$MODEL" --device cuda:0 --dtype "$dtype" --port 18459 --num_beams 5 --max_length 32 >"$OUT/serve-$dtype.log" 2>&1 &
    SERVE=$!
    for _ in $(seq 240); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' localhost:18459/ready)" = 200 ] && break
        sleep 0.5
    done
    echo "GPU memory after loading: $(gpu_mib) MiB"
    curl -s -X POST localhost:18459/keyword_extract -d '{"prompt": "워밍업"}' >/dev/null
    curl -s -o /dev/null -w 'one client: %{time_total} s per request\n' -X POST localhost:18459/keyword_extract \
        -d '{"prompt": "이사화물 통관예약을 하면 뭐가 좋나요?"}'
    end=$((SECONDS + 20))
    peak=0
    clients=()
    for c in $(seq 16); do
        (n=0; while [ $SECONDS -lt $end ]; do
            curl -s -X POST localhost:18459/keyword_extract -d '{"prompt": "해외직구 면세한도는 얼마인가요?"}' >/dev/null && n=$((n + 1))
        done; echo "$n" >"/tmp/kb-client-$c") &
        clients+=($!)
    done
    while [ $SECONDS -lt $end ]; do
        m=$(gpu_mib); [ -n "$m" ] && [ "$m" -gt "$peak" ] && peak=$m
        sleep 0.2
    done
    wait "${clients[@]}"
    total=$(cat /tmp/kb-client-* | awk '{s += $1} END {print s}')
    echo "16 clients: $total requests in 20 s = $(awk -v t="$total" 'BEGIN {printf "%.2f", t / 20}') req/s; peak GPU memory of kb-serve: $peak MiB"
    curl -s localhost:18459/metrics | grep -E '^kb_(batch_size|inference_duration_seconds)_(sum|count)' || true
    kill "$SERVE"; wait "$SERVE" 2>/dev/null
}
gpu_mib() { nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits | awk -F', ' -v p="$SERVE" '$1 == p {print $2}'; }
if want 4; then
    serve_check f32
    serve_check f16
fi

want 5 && {
step "5. the original's serving stack for comparison: transformers generate (beam 5) on cuda:0, f32"
python3 - "$MODEL" <<'PY'
import subprocess, sys, os, torch
from transformers import BartForConditionalGeneration, PreTrainedTokenizerFast
model = BartForConditionalGeneration.from_pretrained(sys.argv[1]).to("cuda").eval()
tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(sys.argv[1], "tokenizer.json"))
ids = torch.tensor([tok.encode("해외직구 면세한도는 얼마인가요?")] * 16, device="cuda")
with torch.no_grad():
    for _ in range(3):
        model.generate(ids, num_beams=5, max_length=32, min_length=32)
torch.cuda.synchronize()
out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                     capture_output=True, text=True).stdout
mine = [l.split(", ")[1] for l in out.splitlines() if l.split(", ")[0] == str(os.getpid())]
print(f"PyTorch process GPU memory after batched beam-5 generation: {mine[0] if mine else '?'} MiB "
      f"(torch max allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB)")
PY
}

echo; echo "gpu_check done"
