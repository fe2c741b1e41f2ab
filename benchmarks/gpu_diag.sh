#!/usr/bin/env bash
# One device run that says where the engine's time goes (issue 10): the linear layers' products beside their
# roofline (both cuBLAS front ends), the prefill attention kernel beside FlashAttention, per-workload kernel
# profiles of both shapes (attention per launch shape), and the host path on this machine's CPU.
#   bash benchmarks/gpu_diag.sh     (carry: .whl; results under $OUT, tarred into $OUT/all.tgz)
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
D=$OUT/diag; mkdir -p $D
# host path with the device work stubbed out, on two spare cores, beside the GPU runs
taskset -c 14,15 timeout 240 python3 -m batchllm_dask.bench.host_time --scales 0.25 --clock wall --repeat 2 \
    --workloads shared-instructions,doc-qa,long-output > $D/host_time.log 2>&1 &
timeout 75 python3 benchmarks/gemm_sweep.py --out $D 2>&1 | tee $D/gemm.log
timeout 100 python3 benchmarks/bench_attention.py --prefill --out $D 2>&1 | tee $D/prefill.log | grep -v Warning
timeout 170 python3 benchmarks/profile_engine.py llama-1b shared-instructions,doc-qa,skewed,long-output,no-sharing 0.25 \
    2>&1 | tee $D/profile_1b.log | grep -v Warning
mv $OUT/profile_llama-1b.json $D/ 2>/dev/null
timeout ${DIAG_8B_S:-210} python3 benchmarks/profile_engine.py llama-8b shared-instructions,doc-qa 0.25 \
    2>&1 | tee $D/profile_8b.log | grep -v Warning
mv $OUT/profile_llama-8b.json $D/ 2>/dev/null
wait
cat $D/host_time.log
tar czf $OUT/all.tgz -C $OUT diag gpu.txt
