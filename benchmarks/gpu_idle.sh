#!/usr/bin/env bash
# Where the llama-1b engine's GPU waits (issue 10), in one device call: the linear layers' products beside their
# roofline (both cuBLAS front ends), the engine at scale 0.25 with a profile of shared-instructions (GPU idle
# before the first kernel, after the last, and the gaps by length) and its ablations (whether each gets the full
# engine's KV pool back: bench.engine prints the dropped engine's release), the same engine with mixed-step CUDA
# graphs up to 16384 tokens (the 1b budget), and the host path with the device work stubbed out on two spare cores.
#   bash benchmarks/gpu_idle.sh     (carry: .whl; results under $OUT, tarred into $OUT/all.tgz)
set -o pipefail
cd "$(dirname "$0")/.."
source benchmarks/device_setup.sh
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
D=$OUT/idle; mkdir -p $D/graphs16k
taskset -c 14,15 timeout 240 python3 -m batchllm_dask.bench.host_time --scales 0.25 --clock wall --repeat 2 \
    --workloads shared-instructions,doc-qa,long-output > $D/host_time.log 2>&1 &
timeout 90 python3 benchmarks/gemm_sweep.py --rows 64,128,176,256,512,2048,16384 --out $D 2>&1 | tee $D/gemm.log
timeout 300 python3 -m batchllm_dask.bench.engine --model llama-1b --scales 0.25 --checkpoint /tmp/ck \
    --profile shared-instructions --ablations sharing-off,decode-first-off,count-bounded --out $D 2>&1 \
    | grep -v Warning | tee $D/bench_1b.log
timeout 200 python3 -m batchllm_dask.bench.engine --model llama-1b --scales 0.25 --checkpoint /tmp/ck \
    --option cuda_graph_max_tokens=16384 --out $D/graphs16k 2>&1 | grep -v Warning | tee $D/graphs16k/bench_1b.log
wait
cat $D/host_time.log
rm -f $D/trace_*.json.gz
tar czf $OUT/all.tgz -C $OUT idle gpu.txt
