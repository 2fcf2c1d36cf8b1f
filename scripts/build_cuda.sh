#!/usr/bin/env bash
# Builds the CUDA release binaries (features cuda + nccl) and kb-core's test executables with CUDA,
# strips them and copies them into OUT_DIR, ready to copy to a GPU machine:
#
#   scripts/build_cuda.sh dist/cuda
#
# The toolchain comes from scripts/cuda_toolchain.sh (PyPI wheels, run here; idempotent), the build
# goes to its own target folder (${KB_CUDA_TARGET:-target/cuda}) so that the CPU build's cache stays
# as it is. CUDA_COMPUTE_CAP picks the GPU architecture (default 90: H100/H200). Also writes
# OUT_DIR.tar.zst: the stripped executables are about 50 MB each, mostly the same kernels, and the
# archive about 3 MB per executable.
# At run time the binaries need the NVIDIA driver (libcuda.so.1) and, on the loader path, CUDA 13's
# libcudart.so.13, libcublas.so.13 (+ libcublasLt.so.13), libcurand.so.10 and, for kb-train and
# kb-core-lib, NCCL's libnccl.so.2: LD_LIBRARY_PATH=$SITE/nvidia/cu13/lib:$SITE/nvidia/nccl/lib
# with the site-packages of a CUDA 13 PyTorch install.
set -euo pipefail
out=$(realpath -m "${1:?usage: scripts/build_cuda.sh OUT_DIR}")
cd "$(dirname "$0")/.."

bins=(kb-train kb-serve kb-extract kb-export kb-eval)
KB_CUDA_HOME=${KB_CUDA_HOME:-$HOME/.cache/kobart-keywords/cuda-13.0}
export KB_CUDA_HOME
export CARGO_TARGET_DIR=${KB_CUDA_TARGET:-target/cuda}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

scripts/cuda_toolchain.sh
# shellcheck source=/dev/null
source "$KB_CUDA_HOME/env.sh"
echo "build_cuda: CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP CARGO_TARGET_DIR=$CARGO_TARGET_DIR"

# The binaries, then kb-core's tests. Both commands name the same packages and features so that
# they resolve the dependencies' features alike and share candle and its CUDA kernels (about 12
# minutes on 2 cores), rather than compiling them twice.
features=kb-train/nccl
pkgs=(-p kb-core)
for b in "${bins[@]}"; do
    features+=",$b/cuda"
    pkgs+=(-p "$b")
done
tests=()
for t in crates/kb-core/tests/*.rs; do
    tests+=(--test "$(basename "$t" .rs)")
done

t0=$SECONDS
artifacts=$(cargo build --release --locked "${pkgs[@]}" --features "$features" \
    --message-format=json-render-diagnostics)
echo "build_cuda: binaries built in $((SECONDS - t0)) s"
t0=$SECONDS
artifacts+=$'\n'$(cargo test --release --locked --no-run "${pkgs[@]}" --features "$features" \
    --lib "${tests[@]}" --message-format=json-render-diagnostics)
echo "build_cuda: kb-core's test executables built in $((SECONDS - t0)) s"

# "<name> <executable>": the binaries, and kb-core's tests named after their file (kb-core-lib: the
# library's unit tests).
mkdir -p "$out"
while read -r name exe; do
    strip -o "$out/$name" "$exe"
done < <(python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    t, test = m["target"], m["profile"]["test"]
    if not test and t["kind"] == ["bin"] and t["name"] in sys.argv[2:]:
        print(t["name"], m["executable"])
    elif test and t["src_path"].startswith(sys.argv[1]):
        print("kb-core-lib" if "lib" in t["kind"] else t["name"], m["executable"])
' "$PWD/crates/kb-core/" "${bins[@]}" <<<"$artifacts")

for b in "${bins[@]}"; do
    [ -x "$out/$b" ] || {
        echo "build_cuda: error: cargo reported no executable for $b" >&2
        exit 1
    }
done
# What the dynamic loader will be asked for; the stub folder must not be a RUNPATH.
for f in "$out"/*; do
    if readelf -d "$f" | grep -q 'R.*PATH'; then
        echo "build_cuda: error: $f has an RPATH/RUNPATH" >&2
        exit 1
    fi
done
needed=$(readelf -d "$out/kb-train" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')
echo "build_cuda: $out/kb-train needs: $needed"
ls -l "$out"
total=$(du -cb "$out"/* | tail -1 | cut -f1)
echo "build_cuda: $((total / 1024 / 1024)) MiB in $out"

# The executables share most of their bytes (the kernels' PTX and cubins), so one archive with a
# long zstd window is small enough to copy around: unpack with
#   tar -I 'zstd -d --long=30' -xf OUT_DIR.tar.zst
if command -v zstd >/dev/null; then
    tar -C "$(dirname "$out")" -cf - "$(basename "$out")" |
        zstd -q -f -T0 -12 --long=30 -o "$out.tar.zst"
    echo "build_cuda: $(($(stat -c %s "$out.tar.zst") / 1024 / 1024)) MiB in $out.tar.zst"
fi
