#!/usr/bin/env bash
# The attention kernel with whole key blocks unmasked (SPLIT_MASKED, 2026-12-04) against every block masked:
# the kernels' GPU tests, the prefill big-tile sweep beside FlashAttention, decode steps as graph replays, and
# the engine on the llama-8b shape with each (same call, same checkpoint).
#   bash benchmarks/gpu_masked.sh     (carry: .whl; results under $OUT, tarred into $OUT/all.tgz)
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
D=$OUT/masked; mkdir -p $D/split $D/all-masked
QUIET="Writing|Loading|UserWarning|warn"
timeout 120 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py 2>&1 | tail -3 | tee $D/gpu_kernel_tests.log
timeout 150 python3 benchmarks/bench_attention.py --prefill --out $D 2>&1 | grep -v Warning | tee $D/prefill.log
OUT=$D timeout 90 python3 benchmarks/decode_attention_sweep.py --variants base,all-masked 2>&1 | tee $D/decode.log
W=${WORKLOADS_8B:-shared-instructions,doc-qa,long-output}
timeout 200 python3 -m batchllm_dask.bench.engine --model llama-8b --scales 0.25 --workloads $W --checkpoint /tmp/ck \
    --out $D/split 2>&1 | grep -v -E "$QUIET" | tee $D/split/engine.log | grep -v '^{'
timeout 150 python3 -c "
import runpy, sys
from batchllm_dask.kernels import prefix_attention
prefix_attention.SPLIT_MASKED = False  # the kernel before 2026-12-04
sys.argv = ['engine'] + sys.argv[1:]
runpy.run_module('batchllm_dask.bench.engine', run_name='__main__')
" --model llama-8b --scales 0.25 --workloads $W --checkpoint /tmp/ck --out $D/all-masked 2>&1 \
    | grep -v -E "$QUIET" | tee $D/all-masked/engine.log | grep -v '^{'
tar czf $OUT/all.tgz -C $OUT masked gpu.txt
