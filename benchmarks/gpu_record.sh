#!/usr/bin/env bash
# The figures of record for one shape in one device call: our engine at main's defaults, vLLM 0.26 on the same
# checkpoint and workloads, then the GPU tests in what time is left.  vLLM's seven wheel parts must be in
# /tmp/vparts first (../shared/bench/vllm/README.md); carry .whl.  Results under $OUT (all.tgz holds them all).
#   bash benchmarks/gpu_record.sh 8b   # llama-8b at 0.25; skewed and shared-instructions also at a 512-request cap
#                                      # (the default before 1024); the GPU tests of the graphs, engine, model, sampler
#   bash benchmarks/gpu_record.sh 1b   # llama-1b at 0.25 and 1.0; the other GPU tests
# Then, here: `python -m batchllm_dask.bench.report FOLDER` on each call's folder.
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh >/dev/null
QUIET="Writing|Loading|UserWarning|warn"
start=$SECONDS
[ -d /tmp/vsite/vllm ] || (cd /tmp/vparts && SMOKE=0 bash part7/install.sh > "$OUT/vllm_install.log" 2>&1)
ours() {  # ours NAME LIMIT [bench args]
    local name=$1 limit=$2; shift 2; mkdir -p "$OUT/$name"
    timeout "$limit" python3 -m batchllm_dask.bench.engine --checkpoint /tmp/ck --out "$OUT/$name" "$@" 2>&1 \
        | grep -v -E "$QUIET" | tee "$OUT/$name/engine.log" | grep -v '^{'
}
peer() {  # peer NAME LIMIT [vllm_peer args]
    local name=$1 limit=$2; shift 2; mkdir -p "$OUT/$name"
    PYTHONPATH=/tmp/vsite:$PYTHONPATH VLLM_USE_FLASHINFER_SAMPLER=0 timeout "$limit" python3 -m \
        batchllm_dask.bench.vllm_peer --out "$OUT/$name" "$@" 2>&1 | tee "$OUT/$name/vllm.log" \
        | grep -E '^\{|vllm|Error|error' | cut -c1-400
}
gpu_tests() {  # gpu_tests FILES...: in the time left of the call's 600 s (less 20 for the archive)
    local left=$((575 - (SECONDS - start)))
    [ "$left" -gt 20 ] && timeout "$left" python3 -m pytest -q -p no:cacheprovider -m gpu "$@" 2>&1 \
        | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|Error|FAILED" | head -30
}
case "${1:?usage: gpu_record.sh 8b|1b}" in
8b)
    ours 8b 170 --model llama-8b --scales 0.25
    peer 8b 190 --checkpoint /tmp/ck/llama-8b --model llama-8b --scales 0.25
    ours 8b-cap512 80 --model llama-8b --scales 0.25 --workloads skewed,shared-instructions --busy-scale -1 \
        --option max_num_seqs=512
    gpu_tests tests/test_cuda_graphs.py tests/test_mixed_graphs.py tests/test_engine.py tests/test_model.py \
        tests/test_sampler.py
    ;;
1b)
    ours 1b 170 --model llama-1b --scales 0.25,1.0
    peer 1b 250 --checkpoint /tmp/ck/llama-1b --model llama-1b --scales 0.25,1.0
    gpu_tests tests/test_kernels.py tests/test_fused_ops.py tests/test_embedded_model.py tests/test_reliability.py \
        tests/test_dask_cluster.py tests/test_spark.py
    ;;
esac
find "$OUT" -name 'trace_*' -delete
tar czf /tmp/all.tgz -C "$OUT" . && mv /tmp/all.tgz "$OUT/all.tgz"
