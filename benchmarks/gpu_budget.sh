#!/usr/bin/env bash
# The step's token budget and the running-request cap A/B'd in one device call (each an engine of its own on the same
# checkpoint): llama-8b at scale 0.25 as on main, with max_num_seqs 1024, and with 1024 and an 8192-token budget;
# llama-1b at scale 1.0 with max_num_seqs 512, 1024 and 2048; then the structured review schema on llama-8b.  Results under $OUT, tarred into $OUT/all.tgz.
#   bash benchmarks/gpu_budget.sh            (carry: .whl)
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh >/dev/null
QUIET="Writing|Loading|UserWarning|warn"
engine() {  # engine NAME TIMEOUT [bench args]
    local name=$1 limit=$2; shift 2; mkdir -p "$OUT/$name"
    timeout "$limit" python3 -m batchllm_dask.bench.engine "$@" --busy-scale -1 --checkpoint /tmp/ck --out "$OUT/$name" \
        2>&1 | grep -v -E "$QUIET" | tee "$OUT/$name/engine.log" | grep -v '^{'
}
engine 8b-base 150 --model llama-8b --scales 0.25 --option max_num_seqs=512
engine 8b-seqs1024 110 --model llama-8b --scales 0.25 --option max_num_seqs=1024
engine 8b-seqs1024-tok8192 110 --model llama-8b --scales 0.25 --option max_num_seqs=1024 --option max_num_batched_tokens=8192
W=shared-instructions,doc-qa,skewed,no-sharing
engine 1b-seqs512 60 --model llama-1b --scales 1.0 --workloads $W --option max_num_seqs=512
engine 1b-seqs1024 60 --model llama-1b --scales 1.0 --workloads $W --option max_num_seqs=1024
engine 1b-seqs2048 60 --model llama-1b --scales 1.0 --workloads $W --option max_num_seqs=2048
mkdir -p "$OUT/structured-8b"
timeout 170 python3 -m batchllm_dask.bench.structured --model llama-8b --schema review --corpus-mb 16 --rounds 2 \
    --out "$OUT/structured-8b" 2>&1 | grep -v -E "$QUIET" | tail -4 | tee "$OUT/structured-8b/runs.log"
tar czf /tmp/all.tgz -C "$OUT" . && mv /tmp/all.tgz "$OUT/all.tgz"
