#!/usr/bin/env bash
# Build the benchmark peers into DIR (default .peers/ at the repository root, git-ignored):
#   DIR/venv        python3 -m venv with llama-cpp-python (built here from its PyPI sdist, CPU),
#                   onnxruntime-genai and what llama.cpp's convert_hf_to_gguf.py needs
#   DIR/src         that sdist and its unpacked tree (the llama.cpp sources it vendors)
#   DIR/bin         llama-server, llama-quantize, llama-perplexity, built with cmake from the SAME vendored tree
#   DIR/peers.json  versions and paths, read by benchmarks/peers.py
# Benchmark-only: mixtrt never imports any of this. Idempotent: a step whose stamp (DIR/stamps/STEP holds the
# versions and flags it was done with) matches and whose output exists is skipped; a second run does nothing.
#
#     benchmarks/setup_peers.sh [DIR]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=$(realpath -m "${1:-$ROOT/.peers}")
PY=${PYTHON:-python3}
JOBS=$(nproc)

LLAMA_CPP_PYTHON=0.3.36
# Everything the peers' venv installs directly, pinned. torch must stay exactly 2.13.0 (the CPU build from local
# disk); onnxruntime matches the version mixtrt's own .venv benchmarks with, so both engines use the same kernels.
PINS=(
    torch==2.13.0 onnxruntime-genai==0.18.0 onnxruntime==1.32.0 onnx==1.23.2 onnx-ir==1.1.0
    transformers==5.24.0 numpy==2.3.5 sentencepiece==0.2.3 safetensors==0.8.0 protobuf==7.36.2
)
# CPU build for this machine's instruction set (onnxruntime dispatches at run time too), for both the Python
# package and the tools; llama_tools adds: static, no TLS, no web UI (whose assets it would download).
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=ON"
TOOLS=(llama-server llama-quantize llama-perplexity)

SDIST=llama_cpp_python-$LLAMA_CPP_PYTHON
SRC=$DIR/src/$SDIST
LLAMA_SRC=$SRC/vendor/llama.cpp
VPY=$DIR/venv/bin/python
mkdir -p "$DIR/stamps" "$DIR/logs"

say() { printf 'setup_peers: %s\n' "$*"; }

# step NAME KEY CHECK-COMMAND -- COMMAND...: run COMMAND (output in DIR/logs/NAME.log) unless the stamp holds KEY
# and CHECK-COMMAND succeeds; on failure print one line naming the step, its log and the log's last line; exit 1.
step() {
    local name=$1 key=$2 check=$3
    shift 4
    if [ "$(cat "$DIR/stamps/$name" 2>/dev/null)" = "$key" ] && eval "$check" >/dev/null 2>&1; then
        say "$name: up to date"
        return
    fi
    say "$name: $key ..."
    local t0=$SECONDS
    # A subshell outside any if / || (where bash would ignore errexit): the step stops at its first failing command.
    set +e
    (set -e; "$@") >"$DIR/logs/$name.log" 2>&1
    local rc=$?
    set -e
    if [ $rc -ne 0 ]; then
        say "FAILED at step '$name': $(grep -v '^\s*$' "$DIR/logs/$name.log" | tail -n 1 | cut -c1-200)" \
            "(full log: $DIR/logs/$name.log)" >&2
        exit 1
    fi
    echo "$key" >"$DIR/stamps/$name"
    echo "$name $((SECONDS - t0))" >>"$DIR/logs/times.txt"
    say "$name: done in $((SECONDS - t0)) s"
}

make_venv() {
    rm -rf "$DIR/venv"
    "$PY" -m venv "$DIR/venv"
    "$VPY" -m pip install --upgrade pip
}

get_sdist() {
    rm -rf "$SRC" "$DIR/src/$SDIST.tar.gz"
    "$VPY" -m pip download --no-binary :all: --no-deps -d "$DIR/src" "llama-cpp-python==$LLAMA_CPP_PYTHON"
    tar -xzf "$DIR/src/$SDIST.tar.gz" -C "$DIR/src"
    test -f "$LLAMA_SRC/convert_hf_to_gguf.py"
}

python_deps() {
    # gguf from the vendored gguf-py: the exact version the vendored converter was written against.
    "$VPY" -m pip install "${PINS[@]}" "$LLAMA_SRC/gguf-py"
    "$VPY" -c "import torch, onnxruntime_genai, transformers, sentencepiece, safetensors, gguf"
}

llama_cpp_python() {
    # From the sdist file: always a source build (no wheel), without the multimodal library.
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS -DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$JOBS \
        "$VPY" -m pip install --force-reinstall --no-deps --no-cache-dir --verbose "$DIR/src/$SDIST.tar.gz"
    "$VPY" -m pip install typing-extensions diskcache jinja2
    "$VPY" -c "import llama_cpp; assert llama_cpp.__version__ == '$LLAMA_CPP_PYTHON'"
}

llama_tools() {
    cmake -S "$LLAMA_SRC" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        $LLAMA_CMAKE_ARGS -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    cmake --build "$DIR/build" -j "$JOBS" --target "${TOOLS[@]}"
    mkdir -p "$DIR/bin"
    for t in "${TOOLS[@]}"; do cp "$DIR/build/bin/$t" "$DIR/bin/$t"; done
    "$DIR/bin/llama-server" --version
}

write_manifest() {
    "$VPY" - "$DIR" "$LLAMA_SRC" <<'EOF'
import json, sys
from importlib.metadata import version
from pathlib import Path

import llama_cpp

d, src = Path(sys.argv[1]), Path(sys.argv[2])
info = {
    "python": str(d / "venv/bin/python"),
    "convert_hf_to_gguf": str(src / "convert_hf_to_gguf.py"),
    "bin": {t: str(d / "bin" / t) for t in ("llama-server", "llama-quantize", "llama-perplexity")},
    "versions": {p: version(p) for p in ("llama_cpp_python", "onnxruntime-genai", "onnxruntime", "gguf", "torch",
                                         "transformers", "sentencepiece", "safetensors", "numpy")},
    "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(),
}
(d / "peers.json").write_text(json.dumps(info, indent=1) + "\n")
EOF
}

step venv "$PY $("$PY" --version 2>/dev/null || true)" "test -x '$VPY'" -- make_venv
step sdist "llama-cpp-python==$LLAMA_CPP_PYTHON" "test -f '$LLAMA_SRC/convert_hf_to_gguf.py'" -- get_sdist
step python-deps "${PINS[*]} gguf-py@$LLAMA_CPP_PYTHON" "'$VPY' -c 'import onnxruntime_genai, gguf'" -- python_deps
step llama-cpp-python "$LLAMA_CPP_PYTHON $LLAMA_CMAKE_ARGS" "'$VPY' -c 'import llama_cpp'" -- llama_cpp_python
step llama-tools "$LLAMA_CPP_PYTHON $LLAMA_CMAKE_ARGS ${TOOLS[*]}" \
    "for t in ${TOOLS[*]}; do test -x '$DIR/bin/'\$t || exit 1; done" -- llama_tools
step manifest "$(cat "$DIR"/stamps/{venv,sdist,python-deps,llama-cpp-python,llama-tools} | md5sum | cut -c1-12)" \
    "test -f '$DIR/peers.json'" -- write_manifest
say "ready: $DIR ($(du -sh "$DIR" | cut -f1)); step times in $DIR/logs/times.txt"
