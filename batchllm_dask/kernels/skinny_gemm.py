"""Linear layers over few rows (decode steps): x [M, K] @ weight[N, K]^T, split over K (Triton).

Why: a decode step multiplies a few hundred rows by every weight of the model, so its matrix products are
bound by the weights' bytes, not by arithmetic.  cuBLAS's tiles for such shapes leave SMs idle: on an H200
(benchmarks/gemm_sweep.py, 2026-12-04) llama-8b's layer at 64-256 rows reaches 61-69% of its roofline and
llama-1b's 41-50% (its 2048-wide output projection is 16 tiles of 128 columns for 132 SMs).

Algorithm.  One program computes a [BLOCK_M, BLOCK_N] tile of the output over one of SPLIT_K equal slices of
K: it streams its weight slab [BLOCK_N, K / SPLIT_K] (the row tiles of one slab run side by side, so HBM
serves it once; the rows' slice of x is re-read from L2 by every column tile) and accumulates on the tensor
cores (`tl.dot`, fp32).  With SPLIT_K > 1 each program writes its fp32 partial to a scratch [SPLIT_K, M, N]
and a second launch sums the partials in a fixed order and rounds them to the output dtype: the result is deterministic (no atomics), the same bits run after run and in a
CUDA graph as eagerly.  The bias, if any, is added before the rounding.

Which shapes take this path is measured, not guessed: `CONFIGS` holds, per (N, K) of a layer and bucket of
rows, the launch settings that beat cuBLAS in benchmarks/skinny_gemm_sweep.py on the device named there;
every other shape returns None from `skinny_config` and the caller keeps `F.linear`.

Limits: x and weight of one dtype (fp16, bf16, fp32; fp32 dots are tf32-free), contiguous rows; K a multiple
of SPLIT_K * BLOCK_K (checked); CUDA tensors, or CPU tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch settings of one product: the output tile, the K step, the K split, warps and pipeline stages."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 64
    split_k: int = 4
    num_warps: int = 4
    num_stages: int = 4

    def fits(self, n_rows: int, n_cols: int, depth: int) -> bool:
        """Whether these settings take an [n_rows, depth] x [n_cols, depth]^T product."""
        return n_rows <= MAX_ROWS and depth % (self.split_k * self.block_k) == 0 and n_cols >= self.block_n


MAX_ROWS = 256  # above this a step's products are compute-bound enough for cuBLAS's big tiles
ROW_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)  # the sweep's row counts: a product's rows round up to one
# (N, K, rows bucket) -> settings that beat cuBLAS there (filled from the sweep; empty: cuBLAS everywhere)
CONFIGS: dict[tuple[int, int, int], SkinnyConfig] = {}
ENABLED = True  # False: every product through F.linear (the sweep's and the ablations' baseline)


def row_bucket(n_rows: int) -> int | None:
    """The smallest sweep bucket holding n_rows, or None above MAX_ROWS."""
    for bucket in ROW_BUCKETS:
        if n_rows <= bucket:
            return bucket
    return None


def skinny_config(n_rows: int, weight: torch.Tensor) -> SkinnyConfig | None:
    """The measured settings for x [n_rows, K] @ weight [N, K]^T, or None (use F.linear)."""
    if not ENABLED or not CONFIGS:
        return None
    bucket = row_bucket(n_rows)
    if bucket is None:
        return None
    config = CONFIGS.get((weight.shape[0], weight.shape[1], bucket))
    return config if config is not None and config.fits(n_rows, *weight.shape) else None


# ------------------------------------------------------------------------------------------------ kernels

@triton.jit
def _skinny_gemm_kernel(X, W, Bias, Out, Part, M, N, K_PER_SPLIT, stride_xm, stride_wn, stride_om,
                        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_N: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # programs: row tiles fastest (the tiles of one weight slab run side by side and read it from HBM once),
    # then column tiles, then K splits
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid % num_m
    pid_n = (pid // num_m) % num_n
    pid_k = pid // (num_m * num_n)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * K_PER_SPLIT + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = X + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, K_PER_SPLIT, BLOCK_K):
        x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        if EVEN_N:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out_ptrs = Out + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=mask)
    else:
        part_ptrs = Part + (pid_k * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
        tl.store(part_ptrs, acc, mask=mask)


@triton.jit
def _sum_splits_kernel(Part, Bias, Out, M, N, stride_om, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    size = M.to(tl.int64) * N
    mask = offs < size
    acc = tl.load(Part + offs, mask=mask, other=0.0)
    for split in tl.static_range(1, SPLIT_K):  # a fixed order: the same sum every run
        acc += tl.load(Part + split * size + offs, mask=mask, other=0.0)
    col = offs % N
    if HAS_BIAS:
        acc += tl.load(Bias + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + (offs // N) * stride_om + col, acc.to(Out.dtype.element_ty), mask=mask)


_SUM_BLOCK = 1024


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: SkinnyConfig,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T (+ bias [N]) with `config`'s launch: [M, N] in x's dtype."""
    assert x.dim() == 2 and weight.dim() == 2 and x.shape[1] == weight.shape[1], (x.shape, weight.shape)
    assert x.dtype == weight.dtype and x.dtype in (torch.float16, torch.bfloat16, torch.float32), x.dtype
    assert x.stride(1) == 1 and weight.stride(1) == 1, "rows must be contiguous"
    assert x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1", "CUDA tensors (or TRITON_INTERPRET=1)"
    m, k = x.shape
    n = weight.shape[0]
    assert k % (config.split_k * config.block_k) == 0, f"K={k} is not a multiple of {config.split_k} x {config.block_k}"
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous(), bias.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device) if out is None else out
    if m == 0:
        return out
    part = out if config.split_k == 1 else torch.empty((config.split_k, m, n), dtype=torch.float32,
                                                       device=x.device)
    bias_arg = bias if bias is not None else out
    grid = (triton.cdiv(n, config.block_n) * config.split_k * triton.cdiv(m, config.block_m),)
    _skinny_gemm_kernel[grid](x, weight, bias_arg, out, part, m, n, k // config.split_k, x.stride(0),
                              weight.stride(0), out.stride(0), HAS_BIAS=bias is not None and config.split_k == 1,
                              SPLIT_K=config.split_k, EVEN_N=n % config.block_n == 0,
                              DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=config.block_m,
                              BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
                              num_stages=config.num_stages)
    if config.split_k > 1:
        _sum_splits_kernel[(triton.cdiv(m * n, _SUM_BLOCK),)](part, bias_arg, out, m, n, out.stride(0),
                                                             HAS_BIAS=bias is not None, SPLIT_K=config.split_k,
                                                             BLOCK=_SUM_BLOCK, num_warps=4)
    return out


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """`layer(x)`, through the split-K kernel where the sweep measured it faster for this shape and row count."""
    config = skinny_config(x.shape[0], layer.weight) if x.dim() == 2 and x.is_cuda else None
    if config is None:
        return layer(x)
    return skinny_linear(x, layer.weight, layer.bias, config)
