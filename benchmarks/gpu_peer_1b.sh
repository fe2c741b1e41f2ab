#!/usr/bin/env bash
# Two device calls on one machine after vLLM's seven wheel parts are in /tmp/vparts (../shared/bench/vllm/README.md);
# carry .whl.  Results under $OUT, tarred into $OUT/all.tgz.
#   bash benchmarks/gpu_peer_1b.sh peers    # installs vLLM; llama-1b at scale 1.0 on skewed, long-output and
#                                           # no-sharing (and no-sharing with a 2 GiB KV pool): ours, then vLLM
#   bash benchmarks/gpu_peer_1b.sh checks   # the GPU tests; llama-1b at 0.25 with its ablations (each should get the
#                                           # full engine's KV pool back); vLLM on no-sharing with a 2 GiB pool
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh >/dev/null
QUIET="Writing|Loading|UserWarning|warn"
W=skewed,long-output,no-sharing
peer() {
    PYTHONPATH=/tmp/vsite:$PYTHONPATH VLLM_USE_FLASHINFER_SAMPLER=0 python3 -m batchllm_dask.bench.vllm_peer \
        --checkpoint /tmp/ck/llama-1b --model llama-1b --out "$OUT" "$@" 2>&1 | grep -E '^\{|vllm|Error|error' ; }
case "${1:?usage: gpu_peer_1b.sh peers|checks}" in
peers)
    [ -d /tmp/vsite/vllm ] || (cd /tmp/vparts && SMOKE=0 bash part7/install.sh > "$OUT/vllm_install.log" 2>&1)
    python3 -m batchllm_dask.bench.engine --model llama-1b --scales 1.0 --workloads $W --checkpoint /tmp/ck \
        --kv-gib 2 --kv-scale 1.0 --kv-workloads no-sharing --out "$OUT" 2>&1 | grep -v -E "$QUIET" \
        | tee "$OUT/bench_llama-1b.log" | grep -v '^{'
    peer --scales 1.0 --workloads $W
    ;;
checks)
    timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tee "$OUT/gpu_tests.log" \
        | grep -E "passed|failed|Error|FAILED" | head -30
    python3 -m batchllm_dask.bench.engine --model llama-1b --scales 0.25 --checkpoint /tmp/ck \
        --ablations sharing-off,decode-first-off,count-bounded --out "$OUT/ablations" 2>&1 | grep -v -E "$QUIET" \
        | tee "$OUT/bench_llama-1b_ablations.log" | grep -v '^{'
    peer --scales 1.0 --workloads no-sharing --kv-gib 2
    ;;
esac
find "$OUT" -name 'trace_*' -delete
tar czf "$OUT/all.tgz" --exclude=all.tgz -C "$OUT" .
