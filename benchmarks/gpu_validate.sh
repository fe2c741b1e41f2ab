#!/usr/bin/env bash
# The whole GPU check of the library in one device run (carry: .whl; results under $OUT):
# every `gpu` test, then the engine benchmark against transformers, then the Dask-layer benchmark at
# scale 0.25 (benchmarks/gpu_dask.sh measures it at the standard scale).
#   bash benchmarks/gpu_validate.sh
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh  # wheels, PYTHONPATH, $OUT, the GPU's name
timeout 330 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" \
    | grep -E "GPU greedy|passed|failed|Error|FAILED"
python3 -m batchllm_dask.bench.engine --out "$OUT" --scale 0.25 --hf-workloads shared-instructions 2>&1 \
    | grep -v -E "Writing|Loading" | tee "$OUT/bench_engine.log" | grep -v '^{'
python3 -m batchllm_dask.bench.dask_layer --out "$OUT" --scale 0.25 2>&1 | grep -v Writing | tee "$OUT/bench_dask.log"
