#!/usr/bin/env bash
# One device run for CUDA graphs of decode steps: the GPU tests (graph tokens equal eager tokens in fp32
# and bf16, graphs replayed, the fixed-grid attention at real sizes), then the engine benchmark on two
# workloads with graphs off and on (no transformers runs).
#   bash benchmarks/gpu_graphs.sh [bench_engine.py options]      (carry: .whl; results under $OUT)
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh  # wheels, PYTHONPATH, $OUT, the GPU's name
timeout 420 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_cuda_graphs.py 2>&1 \
    | tee "$OUT/gpu_graphs_tests.log" | grep -E "GPU graphs|passed|failed|Error|error"
for mode in off on; do
    flag="--cuda-graphs $mode"
    mkdir -p "$OUT/graphs_$mode"
    echo "== cuda graphs $mode"
    python3 -m batchllm_dask.bench.engine --scale 0.25 --workloads long-output,shared-instructions --hf-workloads '' \
        --out "$OUT/graphs_$mode" $flag "$@" 2>&1 | tee "$OUT/bench_graphs_$mode.log" | tail -4
done
