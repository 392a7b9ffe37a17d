#!/usr/bin/env bash
# The GPU checks in one run, for a machine with an NVIDIA GPU, torch and triton (TensorRT where installed):
#   bash scripts/gpu_check.sh OUTDIR
# 1. `pytest -m gpu`: the triton backend's compiled kernels on CUDA against onnxruntime on the same artifacts
#    (tests/gpu), and the TensorRT engines (tests/runtime/test_backend_tensorrt.py; skipped, with the reason, where
#    TensorRT is not installed).
# 2. benchmarks/bench_gpu.py --precision fp16,int4: the kernels against their torch references at Mixtral-8x7B
#    shapes, then decode tok/s and the HBM roofline fraction of the triton backend against torch eager.
# Each part has its own time limit (GPU_TESTS_S, GPU_BENCH_S seconds) and writes into OUTDIR as it goes, so a run
# stopped at a limit keeps what it measured. Exit status: 0 when both parts passed.
set -u -o pipefail
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash scripts/gpu_check.sh OUTDIR" >&2
    exit 2
fi
out=$1
if ! mkdir -p "$out" 2>/dev/null || ! out=$(cd "$out" && pwd) || [ ! -w "$out" ]; then
    echo "gpu_check.sh: cannot make or write the output folder $1" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv >"$out/nvidia-smi.csv" 2>&1
$py -c "import sys, torch, triton, onnxruntime, transformers; print(sys.version.split()[0], 'torch', torch.__version__,
'triton', triton.__version__, 'onnxruntime', onnxruntime.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')" 2>&1 | tee "$out/versions.txt"
rc=0
timeout "${GPU_TESTS_S:-240}" $py -m pytest -m gpu tests/gpu tests/runtime/test_backend_tensorrt.py -q -ra \
    -p no:cacheprovider --timeout 220 --junitxml "$out/pytest-gpu.xml" 2>&1 | tee "$out/pytest-gpu.log" || rc=1
timeout "${GPU_BENCH_S:-300}" $py benchmarks/bench_gpu.py --precision fp16,int4 --out "$out/bench_gpu.json" 2>&1 \
    | tee "$out/bench_gpu.log" || rc=1
exit $rc
