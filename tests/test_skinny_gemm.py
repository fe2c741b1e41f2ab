"""The split-K product of few rows (kernels/skinny_gemm.py) against torch, and its dispatch.

On the CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1) at small ragged shapes
in fp32; the `gpu` test runs the layer shapes the dispatch table names, in bf16, against float32 products.
Outputs are poisoned with NaN before every run; inputs are fresh random draws (the seed is in the message).
"""
from __future__ import annotations

import random

import pytest
import torch
from _helpers import kernel_device

from batchllm_dask.kernels import skinny_gemm
from batchllm_dask.kernels.skinny_gemm import SkinnyConfig, skinny_linear

DEVICE = kernel_device()
pytestmark = pytest.mark.skipif(DEVICE != "cpu" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")


def _inputs(seed: int, m: int, n: int, k: int, dtype: torch.dtype, device: str, bias: bool):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(n, generator=g).to(device=device, dtype=dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("m, n, k, config", [
    (5, 48, 64, SkinnyConfig(block_m=16, block_n=16, block_k=16, split_k=1, num_warps=1, num_stages=1)),
    (37, 40, 128, SkinnyConfig(block_m=16, block_n=16, block_k=16, split_k=4, num_warps=1, num_stages=1)),
    (16, 64, 96, SkinnyConfig(block_m=16, block_n=32, block_k=16, split_k=3, num_warps=1, num_stages=1)),
])
@pytest.mark.parametrize("bias", [False, True])
def test_split_k_product_equals_torch(m, n, k, config, bias):
    """Every row and column (ragged tiles, a column count that is no multiple of the tile) and every K split,
    with and without bias, equals x @ w.T + b computed by torch in float32."""
    seed = random.randrange(2**31)
    x, w, b = _inputs(seed, m, n, k, torch.float32, DEVICE, bias)
    out = torch.full((m, n), float("nan"), device=DEVICE)
    skinny_linear(x, w, b, config, out=out)
    ref = x @ w.T + (b if b is not None else 0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda s: f"seed {seed}: {s}")


def test_split_sum_is_deterministic():
    """The partials are summed in a fixed order: two runs give the same bits."""
    x, w, b = _inputs(random.randrange(2**31), 9, 32, 128, torch.float32, DEVICE, True)
    config = SkinnyConfig(block_m=16, block_n=16, block_k=16, split_k=8, num_warps=1, num_stages=1)
    assert torch.equal(skinny_linear(x, w, b, config), skinny_linear(x, w, b, config))


def test_dispatch_takes_only_measured_shapes(monkeypatch):
    """A shape and row count the table lists gets its settings; other shapes, more rows than MAX_ROWS, a K the
    split does not divide, or the switch off fall back to F.linear (None)."""
    config = SkinnyConfig(block_m=16, block_n=16, block_k=16, split_k=2, num_warps=1, num_stages=1)
    monkeypatch.setattr(skinny_gemm, "CONFIGS", {(32, 64, 64): config})
    w = torch.empty(32, 64)
    assert skinny_gemm.skinny_config(50, w) is config  # 50 rows round up to the 64 bucket
    assert skinny_gemm.skinny_config(65, w) is None  # bucket 96: not measured
    assert skinny_gemm.skinny_config(skinny_gemm.MAX_ROWS + 1, w) is None
    assert skinny_gemm.skinny_config(50, torch.empty(32, 48)) is None
    monkeypatch.setattr(skinny_gemm, "CONFIGS", {(32, 48, 64): config})
    assert skinny_gemm.skinny_config(50, torch.empty(32, 48)) is None  # 48 is no multiple of 2 x 16
    monkeypatch.setattr(skinny_gemm, "CONFIGS", {(32, 64, 64): config})
    monkeypatch.setattr(skinny_gemm, "ENABLED", False)
    assert skinny_gemm.skinny_config(50, w) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("key", sorted(skinny_gemm.CONFIGS) or [None])
def test_gpu_measured_configs_equal_torch_in_bf16(key):
    """Each measured shape and row bucket, in bf16, against the float32 product (bf16 rounding of the output)."""
    if key is None:
        pytest.skip("no shape is measured faster than cuBLAS: every product runs F.linear")
    n, k, rows = key
    seed = random.randrange(2**31)
    x, w, b = _inputs(seed, rows - 3, n, k, torch.bfloat16, "cuda", False)
    out = skinny_linear(x, w, b, skinny_gemm.CONFIGS[key])
    ref = x.float() @ w.float().T
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2, msg=lambda s: f"seed {seed} {key}: {s}")
