"""The linear layers' matrix products at the engine's step sizes, beside their roofline (issue 10).

For one layer of a standard shape (roofline.SHAPES: the fused QKV, the output projection, the fused
gate/up and the down projection, as engine/model.py runs them), `F.linear` over M rows for each M of
--rows, timed as the median of CUDA-graph-free `triton.testing.do_bench` runs, with each cuBLAS front end
torch offers (`torch.backends.cuda.preferred_blas_library`: "cublas", "cublaslt").  Printed per shape
and M: microseconds for the layer's four products, and the share of their roofline
(max(FLOPs / peak, bytes / bandwidth) summed over the four, with the peak and the copy bandwidth
measured in the same run).  Writes gemm_sweep.json under --out.

    python benchmarks/gemm_sweep.py --shapes llama-8b,llama-1b --rows 64,128,176,256,512,2048,4096,16384
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from batchllm_dask.bench.hf_anchor import ceilings  # the bf16 product's FLOP/s and the copy's bytes/s
from batchllm_dask.roofline import SHAPES


def layer_products(shape) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of one layer's products, fused as the engine's model fuses them."""
    q = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    return {"qkv": (q + 2 * kv, shape.hidden), "o": (shape.hidden, q),
            "gate_up": (2 * shape.intermediate, shape.hidden), "down": (shape.hidden, shape.intermediate)}


def time_layer(weights: dict[str, torch.Tensor], rows: int) -> dict[str, float]:
    """Microseconds of each product over `rows` rows."""
    out = {}
    for name, w in weights.items():
        x = torch.randn(rows, w.shape[1], device="cuda", dtype=torch.bfloat16)
        out[name] = 1e3 * do_bench(lambda: F.linear(x, w), warmup=25, rep=100, return_mode="median")
    return out


def roofline_us(weights: dict[str, torch.Tensor], rows: int, peak: float, bandwidth: float) -> float:
    total = 0.0
    for w in weights.values():
        n, k = w.shape
        flops = 2 * rows * n * k
        moved = 2 * (n * k + rows * k + rows * n)  # bf16 weights, input, output
        total += max(flops / peak, moved / bandwidth)
    return 1e6 * total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-8b,llama-1b")
    ap.add_argument("--rows", default="64,128,176,256,512,1024,2048,4096,16384")
    ap.add_argument("--libraries", default="cublas,cublaslt")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    peak, bandwidth = ceilings()
    print(f"{torch.cuda.get_device_name()}: bf16 product {peak / 1e12:.0f} TFLOP/s, copy {bandwidth / 1e12:.2f} TB/s")
    results = []
    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        weights = {name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                   for name, (n, k) in layer_products(shape).items()}
        for library in args.libraries.split(","):
            torch.backends.cuda.preferred_blas_library(library)
            for rows in (int(r) for r in args.rows.split(",")):
                us = time_layer(weights, rows)
                floor = roofline_us(weights, rows, peak, bandwidth)
                total = sum(us.values())
                results.append({"shape": shape_name, "library": library, "rows": rows, "us": us,
                                "total_us": total, "roofline_us": floor, "share": floor / total})
                parts = "  ".join(f"{k} {v:7.1f}" for k, v in us.items())
                print(f"{shape_name:9s} {library:9s} M={rows:6d}  layer {total:8.1f} us  roofline {floor:8.1f} us  "
                      f"{floor / total:5.1%}   {parts}", flush=True)
        torch.backends.cuda.preferred_blas_library("cublas")
    with open(os.path.join(args.out, "gemm_sweep.json"), "w") as f:
        json.dump({"peak_flops": peak, "bandwidth": bandwidth, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
