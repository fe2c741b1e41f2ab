#!/usr/bin/env bash
# The GPU tests, then bench.engine at scale 0.25 on llama-8b and llama-1b (carry: .whl), for BENCHMARKS.md's
# "Where the 8B engine's GPU time goes" section.  OLD=DIR: also run the same bench from an older checkout's
# package in DIR (e.g. `git archive bbaaf40 batchllm_dask | tar -x -C DIR`), run from inside DIR so that
# `python -m` imports that copy and not this one.
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh >/dev/null
QUIET="Writing|Loading|UserWarning|warn"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED"
for m in llama-8b llama-1b; do
  python3 -m batchllm_dask.bench.engine --model $m --scales 0.25 --busy-scale -1 --checkpoint /tmp/ck --out "$OUT/new" 2>&1 \
    | grep -v -E "$QUIET" | tee "$OUT/bench_${m}_new.log" | grep -E "^full|loaded"
  if [ -n "$OLD" ]; then
    (cd "$OLD" && PYTHONPATH=$PWD:/tmp/site python3 -m batchllm_dask.bench.engine --model $m --scales 0.25 --busy-scale -1 \
      --checkpoint /tmp/ck --out "$OUT/old" 2>&1 | grep -v -E "$QUIET" | tee "$OUT/bench_${m}_old.log" | grep -E "^full|loaded")
  fi
done
