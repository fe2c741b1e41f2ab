#!/usr/bin/env bash
# The engine benchmark on one GPU, in two device calls on the same machine (carry: .whl):
#   bash benchmarks/gpu_bench.sh ours   # the GPU tests, then bench.engine on the llama-1b and llama-8b shapes
#   bash benchmarks/gpu_bench.sh vllm   # vLLM 0.26 on the checkpoints `ours` wrote to /tmp/ck, same workloads
# vLLM must be installed in /tmp/vsite first (../shared/bench/vllm/README.md: seven calls carry its wheels).
# Then, here: copy both calls' $OUT into one folder and run `python -m batchllm_dask.bench.report FOLDER`
# (tables against the bound and vLLM, and bench_chart.png).
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh >/dev/null
QUIET="Writing|Loading|UserWarning|warn"
case "${1:?usage: gpu_bench.sh ours|vllm}" in
ours)
    timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" \
        | grep -E "GPU greedy|passed|failed|Error|FAILED" | head -30
    python3 -m batchllm_dask.bench.engine --model llama-1b --scales 0.25,1.0 --checkpoint /tmp/ck \
        --ablations sharing-off,decode-first-off,count-bounded --kv-gib 2 --kv-scale 1.0 \
        --hf-workloads shared-instructions --hf-scale 0.05 --profile shared-instructions --out "$OUT" 2>&1 \
        | grep -v -E "$QUIET" | tee "$OUT/bench_llama-1b.log" | grep -v '^{'
    python3 -m batchllm_dask.bench.engine --model llama-8b --scales "${SCALES_8B:-0.25}" --checkpoint /tmp/ck \
        --profile long-output --out "$OUT" 2>&1 | grep -v -E "$QUIET" | tee "$OUT/bench_llama-8b.log" | grep -v '^{'
    ;;
vllm)
    export PYTHONPATH=/tmp/vsite:$PYTHONPATH VLLM_USE_FLASHINFER_SAMPLER=0
    peer() { python3 -m batchllm_dask.bench.vllm_peer --out "$OUT" "$@" 2>&1 | grep -E '^\{|vllm|Error|error' ; }
    peer --checkpoint /tmp/ck/llama-1b --model llama-1b --scales 0.25,1.0
    peer --checkpoint /tmp/ck/llama-1b --model llama-1b --scales 1.0 --kv-gib 2 \
        --workloads shared-instructions,doc-qa,skewed,no-sharing
    peer --checkpoint /tmp/ck/llama-8b --model llama-8b --scales "${SCALES_8B:-0.25}"
    ;;
esac
# Traces are many and large: one archive comes back instead.
find "$OUT" -name 'trace_*' -print0 | tar czf "$OUT/traces.tgz" --null -T - --remove-files 2>/dev/null
ls "$OUT"
