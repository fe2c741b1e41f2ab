#!/usr/bin/env bash
# max_num_seqs 1024 with 8192-token steps for 8B (the defaults tried at f673990; main keeps 512 since d9ca092) against
# 512 with 4096 (the defaults before), in one device call, after the GPU tests of the runner's paths; llama-1b also
# with decode graphs up to 1024 rows.  Every option is explicit, so later defaults do not change what it runs.
# Results under $OUT, tarred into $OUT/all.tgz.
#   bash benchmarks/gpu_defaults.sh            (carry: .whl)
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh >/dev/null
QUIET="Writing|Loading|UserWarning|warn"
timeout 140 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda_graphs.py tests/test_mixed_graphs.py \
    tests/test_engine.py tests/test_sampler.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.log"
engine() {  # engine NAME TIMEOUT [SETTING=VALUE ...] -- [bench args]
    local name=$1 limit=$2; shift 2; mkdir -p "$OUT/$name"
    timeout "$limit" python3 benchmarks/run_variant.py "$@" --checkpoint /tmp/ck --out "$OUT/$name" 2>&1 \
        | grep -v -E "$QUIET" | tee "$OUT/$name/engine.log" | grep -v '^{'
}
B="batchllm_dask.bench.engine"
engine 8b-new 170 -- $B --model llama-8b --scales 0.25 --option max_num_seqs=1024 --option max_num_batched_tokens=8192
engine 8b-old 110 -- $B --model llama-8b --scales 0.25 --busy-scale -1 --option max_num_seqs=512 \
    --option max_num_batched_tokens=4096
engine 1b-new 90 -- $B --model llama-1b --scales 0.25,1.0 --option max_num_seqs=1024
engine 1b-old 70 -- $B --model llama-1b --scales 0.25,1.0 --busy-scale -1 --option max_num_seqs=512
engine 1b-graphs1024 50 "batchllm_dask.engine.cuda_graphs.BUCKETS=(1,2,4,8,16,24,32,48,64,96,128,192,256,384,512,768,1024)" \
    -- $B --model llama-1b --scales 1.0 --workloads shared-instructions,doc-qa,skewed --busy-scale -1 --option max_num_seqs=1024
tar czf /tmp/all.tgz -C "$OUT" . && mv /tmp/all.tgz "$OUT/all.tgz"
