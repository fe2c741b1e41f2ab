#!/usr/bin/env bash
# One device run for the attention kernels: GPU correctness tests, then the microbenchmark.
#   bash benchmarks/gpu_kernels.sh [--quick | --tune]     (results under $OUT, or ./bench_out)
# The kernels are imported through a shim package holding only batchllm_dask/kernels, so
# the run needs torch and triton alone (not the dataframe layer's dask and pandas).
set -o pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$REPO/bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
SHIM=/tmp/batchllm_kernels_shim
mkdir -p $SHIM/batchllm_dask && : > $SHIM/batchllm_dask/__init__.py
ln -sfn "$REPO/batchllm_dask/kernels" $SHIM/batchllm_dask/kernels
export PYTHONPATH=$SHIM
cd $SHIM
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
[ "$1" = "--tune" ] || timeout 240 python3 -m pytest -q -x -c "$REPO/pyproject.toml" --rootdir $SHIM --noconftest -p no:cacheprovider \
    "$REPO/tests/test_kernels.py" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
python3 "$REPO/benchmarks/bench_attention.py" --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
