#!/usr/bin/env bash
# The grammar host work's switches on llama-1b's review schema, in one device call (carry: .whl; results under $OUT):
# as on main, with masks and forced runs not shared by grammar state, with tokens accepted through the executor's
# threads (off by default since bad59e9; run at 285294f as --no-parallel-accept against that default), and with one
# shared lexer per grammar (--lexer-copies 1, the way before 89010e2).
#   bash benchmarks/gpu_structured_reuse.sh
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh >/dev/null
run() { timeout 150 python3 -m batchllm_dask.bench.structured --model llama-1b --schema review --corpus-mb 16 \
    --rounds 2 --out "$OUT" "$@" 2>&1 | grep -v -E "Writing|Loading|UserWarning|warn" | tail -2 | tee -a "$OUT/runs.log"; }
run
run --no-reuse-by-state
run --parallel-accept
run --lexer-copies 1
