#!/usr/bin/env bash
# The Dask layer on the GPU in one device run (carry: .whl; results under $OUT):
# the GPU cluster tests, then bench_dask (paired rounds of direct and Dask) on shared-instructions at the
# standard scale (1.0) from parquet and from memory, the same with the worker's profiler left sampling (what
# pausing it buys), and scale 0.25 (where the Dask layer's fixed cost weighs most).
#   bash benchmarks/gpu_dask.sh
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh  # wheels, PYTHONPATH, $OUT, the GPU's name
timeout 150 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/test_dask_cluster.py 2>&1 \
    | tee "$OUT/gpu_dask_tests.log" | grep -E "passed|failed|Error|FAILED"
bench() { timeout 240 python3 -m batchllm_dask.bench.dask_layer --out "$OUT" "$@" 2>&1 \
    | grep -v -E "Writing|UserWarning|slowdown|Consider|futures|best-practices|warnings.warn|^$" | tee -a "$OUT/bench_dask.log"; }
bench --scale 1.0
bench --scale 1.0 --sources parquet --keep-profiler --repeats 4
bench --scale 0.25
