#!/usr/bin/env bash
# One device run for the engine: the GPU tests (greedy equality with transformers in fp32 and bf16,
# the kernels through the engine), then the throughput benchmark against transformers.
#   bash benchmarks/gpu_engine.sh [bench_engine.py options]      (carry: .whl; results under $OUT)
set -o pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/bench_out}
mkdir -p "$OUT"
cd "$REPO"
source benchmarks/device_setup.sh
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -s -p no:cacheprovider tests/test_engine.py::test_greedy_matches_transformers_on_gpu \
    tests/test_kernels.py::test_engine_with_triton_attention_gives_the_reference_tokens 2>&1 | tee "$OUT/gpu_engine_tests.log" | grep -E "GPU greedy|passed|failed|Error" 
python3 benchmarks/bench_engine.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench_engine.log"
