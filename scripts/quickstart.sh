#!/usr/bin/env bash
# The offline quickstart: on a machine with no GPU and no internet, build, train a small
# from-scratch model on data/ with the CPU recipe, export it, evaluate it on data/test.tsv, then
# start kb-serve and kb-demo and print their URLs.
#
#   scripts/quickstart.sh                 # full CPU recipe (configs/quickstart-cpu.toml)
#   QUICKSTART_MAX_STEPS=300 scripts/quickstart.sh --no-wait    # shortened (CI): check, then stop
#
# Environment: QUICKSTART_EPOCHS (override max_epochs), QUICKSTART_MAX_STEPS (stop after N steps), QUICKSTART_RUN (run folder, default
# runs/quickstart), KB_SERVE_PORT (8459), KB_DEMO_PORT (8501), KB_PROFILE (release, or dev to
# reuse the binaries `cargo test` built, as CI does).
# --no-wait: after checking that the server answers /keyword_extract, stop both servers and exit.
set -euo pipefail
cd "$(dirname "$0")/.."

wait_forever=1
[[ "${1:-}" == "--no-wait" ]] && wait_forever=0
run="${QUICKSTART_RUN:-runs/quickstart}"
model="$run/export"
serve_port="${KB_SERVE_PORT:-8459}"
demo_port="${KB_DEMO_PORT:-8501}"
epochs_flag=()
[[ -n "${QUICKSTART_EPOCHS:-}" ]] && epochs_flag=(--max_epochs "$QUICKSTART_EPOCHS")
[[ -n "${QUICKSTART_MAX_STEPS:-}" ]] && epochs_flag+=(--max_steps "$QUICKSTART_MAX_STEPS")

profile="${KB_PROFILE:-release}"
if [[ $profile == release ]]; then bin=target/release; build=(--release); else bin=target/debug; build=(); fi

start=$(date +%s)
echo "== build ($profile)"
cargo build "${build[@]}" --locked -p kb-train -p kb-export -p kb-extract -p kb-serve -p kb-demo -p kb-eval

echo "== train (configs/quickstart-cpu.toml, from scratch, CPU)"
rm -rf "$run"
"$bin"/kb-train --config configs/quickstart-cpu.toml --checkpoint "$run" "${epochs_flag[@]}"

echo "== export the best checkpoint"
"$bin"/kb-export --best "$run" --output_dir "$model" --force

echo "== evaluate on data/test.tsv (held out by topic) and data/wild.tsv, free and grounded"
for split in test wild; do
    for mode in free grounded; do
        grounded=()
        [[ $mode == grounded ]] && grounded=(--grounded)
        echo "-- $split, $mode"
        "$bin"/kb-eval --model "$model" --data "data/$split.tsv" --synonyms configs/synonyms.tsv \
            "${grounded[@]}" --report "$run/misses-$split-$mode.tsv" | tee "$run/eval-$split-$mode.txt"
    done
done

echo "== serve"
"$bin"/kb-serve --model "$model" --port "$serve_port" > "$run/serve.log" 2>&1 &
serve_pid=$!
"$bin"/kb-demo --server "http://127.0.0.1:$serve_port" --port "$demo_port" > "$run/demo.log" 2>&1 &
demo_pid=$!
trap 'kill $serve_pid $demo_pid 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$serve_port/ready" > /dev/null && break
    sleep 0.5
done
answer=$(curl -sf -X POST "http://127.0.0.1:$serve_port/keyword_extract" \
    -d '{"prompt": "이사화물 통관예약을 하면 뭐가 좋나요?"}')
echo "POST /keyword_extract → $answer"
echo "$answer" | grep -q '"result"' || { echo "kb-serve did not answer" >&2; exit 1; }
echo
echo "quickstart done in $(( $(date +%s) - start )) s"
echo "  model:     $model"
echo "  metrics:   $run/metrics.jsonl, loss curve $run/loss.svg, evaluation $run/eval-*.txt"
echo "  kb-serve:  http://127.0.0.1:$serve_port/keyword_extract"
echo "  demo page: http://127.0.0.1:$demo_port/"
if [[ $wait_forever == 1 ]]; then
    echo "(Ctrl-C stops both servers)"
    wait
fi
