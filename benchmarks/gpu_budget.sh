#!/usr/bin/env bash
# The step's token budget and the running-request cap A/B'd in one device call (each an engine of its own on the same
# checkpoint): llama-8b at scale 0.25 with 512 requests and 4096 tokens a step (main's defaults then), with
# max_num_seqs 1024, and with 1024 and 8192 tokens; llama-1b at scale 1.0 with max_num_seqs 512, 1024 and 2048; then
# the structured review schema on llama-8b.  It ran at c500d93, whose decode graphs went up to 1024 rows; main's stop
# at 512, so the graph sizes are set here (run_variant), as are all the options.  Results under $OUT, tarred into
# $OUT/all.tgz.
#   bash benchmarks/gpu_budget.sh            (carry: .whl)
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh >/dev/null
QUIET="Writing|Loading|UserWarning|warn"
GRAPHS="batchllm_dask.engine.cuda_graphs.BUCKETS=(1,2,4,8,16,24,32,48,64,96,128,192,256,384,512,768,1024)"
engine() {  # engine NAME TIMEOUT [bench args]
    local name=$1 limit=$2; shift 2; mkdir -p "$OUT/$name"
    timeout "$limit" python3 benchmarks/run_variant.py "$GRAPHS" -- batchllm_dask.bench.engine "$@" --busy-scale -1 \
        --checkpoint /tmp/ck --out "$OUT/$name" \
        2>&1 | grep -v -E "$QUIET" | tee "$OUT/$name/engine.log" | grep -v '^{'
}
engine 8b-base 150 --model llama-8b --scales 0.25 --option max_num_seqs=512 --option max_num_batched_tokens=4096
engine 8b-seqs1024 110 --model llama-8b --scales 0.25 --option max_num_seqs=1024 --option max_num_batched_tokens=4096
engine 8b-seqs1024-tok8192 110 --model llama-8b --scales 0.25 --option max_num_seqs=1024 --option max_num_batched_tokens=8192
W=shared-instructions,doc-qa,skewed,no-sharing
engine 1b-seqs512 60 --model llama-1b --scales 1.0 --workloads $W --option max_num_seqs=512
engine 1b-seqs1024 60 --model llama-1b --scales 1.0 --workloads $W --option max_num_seqs=1024
engine 1b-seqs2048 60 --model llama-1b --scales 1.0 --workloads $W --option max_num_seqs=2048
mkdir -p "$OUT/structured-8b"
timeout 170 python3 -m batchllm_dask.bench.structured --model llama-8b --schema review --corpus-mb 16 --rounds 2 \
    --out "$OUT/structured-8b" 2>&1 | grep -v -E "$QUIET" | tail -4 | tee "$OUT/structured-8b/runs.log"
tar czf /tmp/all.tgz -C "$OUT" . && mv /tmp/all.tgz "$OUT/all.tgz"
