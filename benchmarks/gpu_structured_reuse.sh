#!/usr/bin/env bash
# Whether the grammar host work of 2026-12-03 (masks and forced runs shared by grammar state, tokens accepted through
# the executor's threads) is what made llama-1b's review schema slower (0.30 -> 0.20, BENCHMARKS.md): the same
# bench.structured run with each switched off, in one device call (carry: .whl; results under $OUT).
#   bash benchmarks/gpu_structured_reuse.sh
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh >/dev/null
run() { timeout 150 python3 -m batchllm_dask.bench.structured --model llama-1b --schema review --corpus-mb 16 \
    --rounds 2 --out "$OUT" "$@" 2>&1 | grep -v -E "Writing|Loading|UserWarning|warn" | tail -2 | tee -a "$OUT/runs.log"; }
run
run --no-reuse-by-state
run --no-parallel-accept
