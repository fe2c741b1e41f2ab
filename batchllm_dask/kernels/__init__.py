"""Attention kernels.  They know tensors and index arrays, never requests.

`paged_attention` is the one seam the engine calls: the Triton kernels on CUDA
(fp16/bf16/fp32; head_dims that are powers of two from 16 to 256, others fall
back to the reference with a warning), the torch reference everywhere else.
"""
from __future__ import annotations

import torch

from .reference import AttentionWork, paged_attention_reference, write_kv

__all__ = ["AttentionWork", "paged_attention", "paged_attention_reference", "write_kv", "triton_supported",
           "uses_triton"]


def triton_supported(q: torch.Tensor) -> bool:
    """Whether the Triton path takes these queries (it warns and falls back itself for odd head_dims)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def uses_triton(backend: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether `paged_attention` will run the Triton kernel for queries of this device, dtype and head_dim
    (so a caller can plan the kernel's tiles itself and send the plan with its other inputs)."""
    if backend == "torch":
        return False
    if backend == "auto" and not (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32)):
        return False
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, work: AttentionWork,
                    sm_scale: float, backend: str = "auto") -> torch.Tensor:
    """Attention of q [T, Hq, D] over the paged pool as described by `work` (see reference.py).

    backend: "auto" (Triton where supported, else torch), "torch", or "triton".
    """
    if backend == "torch" or (backend == "auto" and not triton_supported(q)):
        return paged_attention_reference(q, k_cache, v_cache, work, sm_scale)
    from .prefix_attention import fused_paged_attention
    return fused_paged_attention(q, k_cache, v_cache, work, sm_scale)
