#!/usr/bin/env bash
# Structured output's throughput against the same job unconstrained, on one GPU (carry: .whl), for BENCHMARKS.md's
# "Structured output" section: both schemas of bench.structured on the llama-1b and llama-8b shapes.
#   bash benchmarks/gpu_structured.sh                      # jump-forward on (the default)
#   EXTRA=--no-jump-forward bash benchmarks/gpu_structured.sh
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh >/dev/null
run() { timeout 120 python3 -m batchllm_dask.bench.structured --corpus-mb 16 --rounds 2 --out "$OUT" $EXTRA "$@" 2>&1 \
    | grep -v -E "Writing|Loading|UserWarning|warn" | tail -3; }
for schema in classify review; do
  run --model llama-1b --schema $schema
  run --model llama-8b --scale 0.25 --schema $schema
done
