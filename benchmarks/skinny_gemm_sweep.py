"""The split-K product of few rows (kernels/skinny_gemm.py) against cuBLAS at decode shapes (issue 10).

For each linear layer of the standard shapes (roofline.SHAPES: the fused QKV, the output projection, the
fused gate/up and the down projection, as engine/model.py runs them) and each row bucket of
skinny_gemm.ROW_BUCKETS, `F.linear` (cuBLAS) and every candidate launch setting of the split-K kernel, timed
as the median of `triton.testing.do_bench` (the L2 flushed before each run), each candidate checked against
cuBLAS's output first.  Prints per shape and bucket the best candidate, its time against cuBLAS's and both
against the roofline (max(FLOPs / peak, bytes / bandwidth), from the ceilings measured in the same run), and
writes skinny_gemm_sweep.json under --out with the `CONFIGS` entries (the best candidate where it beats
cuBLAS by --margin) to paste into the module.

    python benchmarks/skinny_gemm_sweep.py --shapes llama-8b,llama-1b
"""
from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from batchllm_dask.bench.hf_anchor import ceilings
from batchllm_dask.kernels.skinny_gemm import ROW_BUCKETS, SkinnyConfig, skinny_linear
from batchllm_dask.roofline import SHAPES

from gemm_sweep import layer_products  # noqa: E402  (benchmarks/ is on sys.path when run as a script)


def candidates(bucket: int) -> list[SkinnyConfig]:
    """Launch settings tried for a row bucket: the row tile holds the bucket (one tile: the weight is read once)."""
    block_m = min(256, max(32, triton.next_power_of_2(bucket)))
    warps = 4 if block_m <= 64 else 8
    out = []
    for block_n, block_k, split_k in itertools.product((64, 128), (64, 128), (1, 2, 4, 8)):
        stages = 4 if block_k == 64 else 3
        if (block_m + block_n) * block_k * 2 * stages > 200 * 1024:  # shared memory of the pipeline
            stages = max(2, (200 * 1024) // ((block_m + block_n) * block_k * 2))
        out.append(SkinnyConfig(block_m, block_n, block_k, split_k, warps, stages))
    return out


def roofline_us(n: int, k: int, rows: int, peak: float, bandwidth: float) -> float:
    return 1e6 * max(2 * rows * n * k / peak, 2 * (n * k + rows * k + rows * n) / bandwidth)


def sweep_product(name: str, n: int, k: int, bucket: int, peak: float, bandwidth: float) -> dict:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(bucket, k, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x, w)
    cublas = 1e3 * do_bench(lambda: F.linear(x, w), warmup=10, rep=40, return_mode="median")
    best, best_us, tried = None, float("inf"), 0
    for config in candidates(bucket):
        if not config.fits(bucket, n, k):
            continue
        try:
            out = skinny_linear(x, w, None, config)
        except Exception as error:  # out of shared memory or registers for this setting
            print(f"    skipped {config}: {type(error).__name__}", flush=True)
            continue
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert err < 1e-2, (name, n, k, bucket, config, err)
        us = 1e3 * do_bench(lambda c=config: skinny_linear(x, w, None, c), warmup=10, rep=40, return_mode="median")
        tried += 1
        if us < best_us:
            best, best_us = config, us
    floor = roofline_us(n, k, bucket, peak, bandwidth)
    return {"product": name, "n": n, "k": k, "rows": bucket, "cublas_us": cublas, "best_us": best_us,
            "best": best.__dict__ if best else None, "tried": tried, "roofline_us": floor,
            "cublas_share": floor / cublas, "best_share": floor / best_us if best else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="llama-8b,llama-1b")
    ap.add_argument("--buckets", default=",".join(map(str, ROW_BUCKETS)))
    ap.add_argument("--margin", type=float, default=0.97, help="take the kernel where best < margin x cuBLAS")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    peak, bandwidth = ceilings()
    print(f"{torch.cuda.get_device_name()}: bf16 product {peak / 1e12:.0f} TFLOP/s, copy {bandwidth / 1e12:.2f} TB/s",
          flush=True)
    results, configs = [], {}
    for shape_name in args.shapes.split(","):
        for name, (n, k) in layer_products(SHAPES[shape_name]).items():
            for bucket in (int(b) for b in args.buckets.split(",")):
                r = sweep_product(name, n, k, bucket, peak, bandwidth)
                r["shape"] = shape_name
                results.append(r)
                win = r["best"] is not None and r["best_us"] < args.margin * r["cublas_us"]
                if win:
                    configs[f"({n}, {k}, {bucket})"] = "SkinnyConfig({block_m}, {block_n}, {block_k}, {split_k}, " \
                                                     "{num_warps}, {num_stages})".format(**r["best"])
                print(f"{shape_name:9s} {name:8s} N={n:6d} K={k:6d} rows {bucket:4d}: cuBLAS {r['cublas_us']:7.1f} us "
                      f"({r['cublas_share']:5.1%}), split-K {r['best_us']:7.1f} us ({r['best_share']:5.1%}) "
                      f"{r['cublas_us'] / r['best_us']:5.2f}x {'TAKEN ' if win else ''}{r['best']}", flush=True)
                torch.cuda.empty_cache()
    print("CONFIGS = {" + ", ".join(f"{k}: {v}" for k, v in configs.items()) + "}", flush=True)
    with open(os.path.join(args.out, "skinny_gemm_sweep.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "peak": peak, "bandwidth": bandwidth,
                   "results": results, "configs": configs}, f, indent=1)


if __name__ == "__main__":
    main()
