#!/usr/bin/env bash
# Planner and kernel constants A/B'd on the llama-8b shape in one device call, each variant an engine process of its
# own on the same checkpoint (benchmarks/run_variant.py), after the sampler's GPU tests; then llama-1b long-output at
# scale 1.0 profiled.  Results under $OUT, tarred into $OUT/all.tgz.
#   bash benchmarks/gpu_variants.sh            (carry: .whl)
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh >/dev/null
QUIET="Writing|Loading|UserWarning|warn"
AP=batchllm_dask.kernels.attention_plan
W=shared-instructions,doc-qa,skewed
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_sampler.py tests/test_engine.py 2>&1 \
    | tail -3 | tee "$OUT/gpu_tests.log"
engine() {  # engine NAME TIMEOUT [SETTING=VALUE ...] -- [bench args]
    local name=$1 limit=$2; shift 2; mkdir -p "$OUT/$name"
    timeout "$limit" python3 benchmarks/run_variant.py "$@" --out "$OUT/$name" 2>&1 | grep -v -E "$QUIET" \
        | tee "$OUT/$name/engine.log" | grep -v '^{'
}
engine 8b-base 200 -- batchllm_dask.bench.engine --model llama-8b --scales 0.25 --checkpoint /tmp/ck --profile skewed
engine 8b-programs4 110 $AP.PROGRAMS_PER_SM=4 -- batchllm_dask.bench.engine --model llama-8b --scales 0.25 \
    --workloads $W --busy-scale -1 --checkpoint /tmp/ck
engine 8b-bigm128 110 $AP.BIG_M_MAX=128 -- batchllm_dask.bench.engine --model llama-8b --scales 0.25 \
    --workloads $W,long-output --busy-scale -1 --checkpoint /tmp/ck
engine 1b-long 100 -- batchllm_dask.bench.engine --model llama-1b --scales 1.0 --workloads long-output,shared-instructions \
    --busy-scale 1.0 --profile long-output --checkpoint /tmp/ck
tar czf "$OUT/all.tgz" -C "$OUT" --exclude all.tgz .
