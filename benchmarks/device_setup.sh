# Source this on the device machine from the repository root (carry: .whl):
#     source benchmarks/device_setup.sh
# It installs the wheels the device image lacks (dask, distributed and their pure-Python
# needs: partd, locket, tblib, zict, tornado; dask-cuda; llguidance, the grammar library, which needs
# nothing else) into /tmp/site, puts them and this
# checkout on PYTHONPATH (which spawned Dask worker processes inherit), makes $OUT (default
# ./bench_out), and prints the GPU.  The wheels are fetched here with:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 \
#     -d .whl dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 zict==3.0.0 \
#     tornado==6.6.1 dask-cuda==26.10.0 llguidance==1.9.1 \
#     pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 jsonschema==4.26.0 \
#     jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1   # the test suite imports these
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export OUT=${OUT:-$PWD/bench_out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
