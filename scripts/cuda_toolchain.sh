#!/usr/bin/env bash
# Sets up a CUDA 13.0 build toolchain from PyPI wheels, for building the `cuda`/`nccl` features on a
# machine with no CUDA toolkit and no GPU (CI, a laptop). Idempotent: re-running skips what is done.
#
#   scripts/cuda_toolchain.sh        # into ${KB_CUDA_HOME:-~/.cache/kobart-keywords/cuda-13.0}
#   source "$KB_CUDA_HOME/env.sh"    # nvcc on PATH, CUDA_ROOT, CUDA_COMPUTE_CAP, LIBRARY_PATH
#   cargo build --release -p kb-train --features cuda,nccl
#
# What it makes under KB_CUDA_HOME:
#   site/   the wheels' files (nvidia/cu13: nvcc, headers, cuBLAS, cuRAND, NVRTC, cudart;
#           nvidia/nccl)
#   link/   unversioned names for the linker (libcublas.so -> libcublas.so.13, ...) and a stub
#           libcuda.so (soname libcuda.so.1) generated from cuda.h: it is for linking only; at run
#           time the NVIDIA driver's libcuda.so.1 is loaded. Nothing points an rpath at link/.
#   env.sh  the environment for a CUDA build (it leaves RUSTFLAGS alone, so CPU builds keep their
#           cache)
#
# Variables: KB_CUDA_HOME (install folder), PYTHON (interpreter that runs pip, default python3),
# CUDA_COMPUTE_CAP (default in env.sh: 90 = H100/H200; 80 = A100, 86 = RTX 30xx, 89 = L4/RTX 40xx).
set -euo pipefail

KB_CUDA_HOME=${KB_CUDA_HOME:-$HOME/.cache/kobart-keywords/cuda-13.0}
PYTHON=${PYTHON:-python3}

# Exact versions, installed with --no-deps: nvcc needs nvvm, crt and the runtime headers; nvvm is
# pinned because a newer one emits PTX that ptxas 13.0 rejects.
PINS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
    nvidia-nccl-cu13==2.32.3
)

SITE=$KB_CUDA_HOME/site
LINK=$KB_CUDA_HOME/link
CU=$SITE/nvidia/cu13
NCCL=$SITE/nvidia/nccl
STAMP=$SITE/.kb-pins
start=$SECONDS

say() { echo "cuda_toolchain: $*"; }
die() {
    echo "cuda_toolchain: error: $*" >&2
    exit 1
}

is_root() { [ "$(id -u)" = 0 ]; }

apt_install() {
    if is_root && command -v apt-get >/dev/null; then
        say "apt-get install -y $*"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        return 1
    fi
}

# pip_install PYTHON DIR: installs the pins into DIR with that interpreter's pip.
pip_install() {
    PIP_ROOT_USER_ACTION=ignore "$1" -m pip install --quiet --disable-pip-version-check --no-input \
        --no-deps --no-compile --only-binary=:all: --target "$2" "${PINS[@]}"
}

# A venv of our own, for when the interpreter has no pip or refuses to install (PEP 668).
VENV=$KB_CUDA_HOME/venv
make_venv() {
    local venv=$VENV
    if [ ! -x "$venv/bin/python" ]; then
        say "creating a venv for pip at $venv"
        rm -rf "$venv"
        if ! "$PYTHON" -m venv "$venv" >/dev/null 2>&1; then
            rm -rf "$venv"
            apt_install python3-venv python3-pip ||
                die "'$PYTHON -m venv' failed; install python3-venv, or set PYTHON"
            "$PYTHON" -m venv "$venv"
        fi
    fi
}

install_wheels() {
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${PINS[*]}" ] && [ -x "$CU/bin/nvcc" ]; then
        say "wheels already installed in $SITE"
        return
    fi
    if ! command -v "$PYTHON" >/dev/null; then
        apt_install python3 python3-venv python3-pip ||
            die "no '$PYTHON'; set PYTHON or install python3"
    fi
    local new=$KB_CUDA_HOME/site.new t0=$SECONDS ok=
    rm -rf "$new"
    mkdir -p "$KB_CUDA_HOME"
    say "installing ${#PINS[@]} wheels into $SITE (about 0.9 GB to download, 1.5 GB installed)"
    if [ -x "$VENV/bin/python" ]; then
        pip_install "$VENV/bin/python" "$new" && ok=1
    elif "$PYTHON" -m pip --version >/dev/null 2>&1; then
        pip_install "$PYTHON" "$new" && ok=1
        [ -n "$ok" ] || say "'$PYTHON -m pip' failed; retrying from a venv"
    fi
    if [ -z "$ok" ]; then
        rm -rf "$new"
        make_venv
        pip_install "$VENV/bin/python" "$new"
    fi
    echo "${PINS[*]}" >"$new/.kb-pins"
    rm -rf "$SITE"
    mv "$new" "$SITE"
    say "pip took $((SECONDS - t0)) s"
}

# The versioned names the wheels ship, under the names the linker looks for (-lcublas ->
# libcublas.so). Only what is missing or different is touched, so a build that links meanwhile is
# safe.
make_links() {
    local name rel
    mkdir -p "$LINK"
    for name in cublas:cu13/lib/libcublas.so.13 cublasLt:cu13/lib/libcublasLt.so.13 \
        curand:cu13/lib/libcurand.so.10 nvrtc:cu13/lib/libnvrtc.so.13 \
        cudart:cu13/lib/libcudart.so.13 nccl:nccl/lib/libnccl.so.2; do
        rel=../site/nvidia/${name#*:}
        [ -e "$LINK/$rel" ] || die "missing $SITE/nvidia/${name#*:}"
        if [ "$(readlink "$LINK/lib${name%%:*}.so")" != "$rel" ]; then
            ln -sfn "$rel" "$LINK/lib${name%%:*}.so"
        fi
    done
}

# A link-time stand-in for the driver's libcuda.so.1, like the toolkit's lib64/stubs/libcuda.so:
# one function per cu* name that cuda.h declares (the versioned names its macros select, the
# older ones and the per-thread-stream ones), each returning CUDA_ERROR_STUB_LIBRARY (34) should
# it ever be loaded.
make_cuda_stub() {
    local inc=$CU/include src=$LINK/libcuda-stub.c
    {
        echo "/* Generated by scripts/cuda_toolchain.sh from $inc/cuda.h: link-time stub only. */"
        {
            cc -E -P -x c -I"$inc" "$inc/cuda.h"
            cc -E -P -x c -D__CUDA_API_VERSION_INTERNAL -I"$inc" "$inc/cuda.h"
            cc -E -P -x c -DCUDA_API_PER_THREAD_DEFAULT_STREAM -I"$inc" "$inc/cuda.h"
        } | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' \t(' | sort -u |
            sed 's/.*/int &(void) { return 34; }/'
    } >"$src.new"
    if [ -f "$LINK/libcuda.so" ] && cmp -s "$src.new" "$src"; then
        rm "$src.new"
    else
        mv -f "$src.new" "$src"
        cc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so.new" "$src"
        mv -f "$LINK/libcuda.so.new" "$LINK/libcuda.so"
    fi
    say "stub libcuda.so: $(grep -c '^int ' "$src") symbols"
}

write_env() {
    local q_home q_cu q_link q_nccl
    printf -v q_home '%q' "$KB_CUDA_HOME"
    printf -v q_cu '%q' "$CU"
    printf -v q_link '%q' "$LINK"
    printf -v q_nccl '%q' "$NCCL"
    cat >"$KB_CUDA_HOME/env.sh.new" <<EOF
# Generated by scripts/cuda_toolchain.sh. Source it before a \`--features cuda\` build.
export KB_CUDA_HOME=$q_home
# nvcc (cudarc runs \`nvcc --version\` to pick the CUDA version; candle-kernels compiles with it)
export PATH=$q_cu/bin:\$PATH
export CUDA_ROOT=$q_cu CUDA_PATH=$q_cu CUDA_HOME=$q_cu
# GPU architecture of the kernels: 90 = H100/H200, 80 = A100, 86 = RTX 30xx, 89 = L4/RTX 40xx
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
# Link-time only: unversioned library names and the libcuda stub (the linker reads LIBRARY_PATH)
export LIBRARY_PATH=$q_link\${LIBRARY_PATH:+:\$LIBRARY_PATH}
# NCCL (cudarc has prebuilt bindings for the NCCL 2.30 API and needs no headers; for C/C++ tools)
export NCCL_HOME=$q_nccl
EOF
    mv -f "$KB_CUDA_HOME/env.sh.new" "$KB_CUDA_HOME/env.sh"
}

install_wheels
make_links
make_cuda_stub
write_env

"$CU/bin/nvcc" --version | grep release
say "link folder $LINK: $(cd "$LINK" && echo *.so)"
say "done in $((SECONDS - start)) s; now: source $KB_CUDA_HOME/env.sh"
