"""Fused elementwise ops of a decoder layer (Triton): each one launch where eager torch takes 2 to 14.

On a fast GPU a decode step is bound by launch overhead, not by these ops' bytes,
so what matters is the count of launches.  Three kernels, each rounding to the
activation dtype exactly where the torch reference (reference.py) does, so that
fp16/bf16 results equal it up to the last bit of an rsqrt or an exp:

* `rms_norm`: one program per row.  Optionally adds the residual first (the
  pre-norm residual stream, vLLM's `RMSNorm(x, residual)`), rounds the sum to
  the activation dtype, takes float32 statistics of the rounded sum, and applies
  HF's order `weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`.  Returns the
  normed rows and the sum (the next residual).
* `rope_and_store_kv`: one program per token, all heads.  Rotate-half RoPE (HF
  layout) on q and k with cos/sin cast to the activation dtype first, each
  product and sum rounded like eager bf16 ops; rotated k and v are stored into
  the paged caches at the token's flat slot.  q may be rotated in place.
* `silu_and_mul`: [gate | up] -> silu(gate) * up, silu rounded before the product.

Limits: rows held whole in registers (hidden size and heads * head_dim up to a
few ten thousand elements); last dims contiguous; head_dim even (any size, the
half is padded to a power of two); fp16, bf16 or fp32.  CUDA tensors, or CPU
tensors under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_SILU_BLOCK = 1024  # columns per silu_and_mul program: a decode step still fills the GPU with 8k columns


def _check_device(*tensors: torch.Tensor) -> None:
    on_gpu = tensors[0].is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    assert on_gpu, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"
    assert all(t.device == tensors[0].device for t in tensors), "tensors on different devices"


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every output is allocated here (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _num_warps(elements: int) -> int:
    """About 256 elements per warp, a power of two from 1 to 16."""
    return max(1, min(16, triton.next_power_of_2(elements) // 256))


# ------------------------------------------------------------------------------------------------ rms_norm

@triton.jit
def _rms_norm_kernel(X, Residual, Weight, Out, Sum, n_cols, eps, stride_x, stride_r, stride_o, stride_s,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK)
    mask_c = offs_c < n_cols
    x = tl.load(X + row * stride_x + offs_c, mask=mask_c, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs_c, mask=mask_c, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # eager `x + residual` rounds here
        tl.store(Sum + row * stride_s + offs_c, x, mask=mask_c)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    normed = (xf * rstd).to(x.dtype).to(tl.float32)  # cast back before the weight: HF's order
    w = tl.load(Weight + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + offs_c, (w * normed).to(Out.dtype.element_ty), mask=mask_c)


def _launch_rms_norm(x, weight, eps, residual, out, new_residual) -> None:
    rows, cols = x.shape
    block = triton.next_power_of_2(cols)
    has_residual = residual is not None
    r = residual if has_residual else x  # an unused pointer must still be a tensor
    s = new_residual if has_residual else x
    _rms_norm_kernel[(rows,)](x, r, weight, out, s, cols, eps, x.stride(0), r.stride(0), out.stride(0),
                              s.stride(0), HAS_RESIDUAL=has_residual, BLOCK=block, num_warps=_num_warps(block))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of the rows of (x + residual), in one launch.

    x, residual: [T, H] of one dtype; weight: [H] of that dtype.  Returns
    (out [T, H], new_residual [T, H]): the normed rows and x + residual (x itself
    when residual is None).  Equals `reference.rms_norm_reference`.
    """
    assert x.dim() == 2 and weight.shape == (x.shape[1],), f"x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    assert x.dtype in _DTYPES and weight.dtype == x.dtype, f"x {x.dtype}, weight {weight.dtype}"
    assert x.stride(1) == 1 and weight.stride(0) == 1, "rows must be contiguous"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1, "residual"
    _check_device(x, weight, *([] if residual is None else [residual]))
    out = _empty(x.shape, x.dtype, x.device)
    new_residual = x if residual is None else _empty(x.shape, x.dtype, x.device)
    if x.shape[0]:
        _launch_rms_norm(x, weight, eps, residual, out, new_residual)
    return out, new_residual


# --------------------------------------------------------------------------------------- rope_and_store_kv

@triton.jit
def _rotate(x1, x2, c, s):
    """Rotate-half RoPE of one half pair, rounded per op like eager fp16/bf16 (products are exact in fp32)."""
    dtype = x1.dtype
    a = (x1.to(tl.float32) * c).to(dtype).to(tl.float32)
    b = (x2.to(tl.float32) * s).to(dtype).to(tl.float32)
    e = (x2.to(tl.float32) * c).to(dtype).to(tl.float32)
    f = (x1.to(tl.float32) * s).to(dtype).to(tl.float32)
    return (a - b).to(dtype), (e + f).to(dtype)


@triton.jit
def _rope_store_kernel(Q, K, V, Cos, Sin, K_cache, V_cache, Slots, Q_out,
                       stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct, stride_st,
                       stride_cache_slot, stride_cache_h, stride_ot, stride_oh,
                       NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
                       HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    tok = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    offs_h = tl.arange(0, HEADS_PAD)
    offs_kh = tl.arange(0, KV_HEADS_PAD)
    mask_d = offs_d < HALF
    mask_q = (offs_h < NUM_HEADS)[:, None] & mask_d[None, :]
    mask_kv = (offs_kh < NUM_KV_HEADS)[:, None] & mask_d[None, :]
    # HF casts the float32 tables to the activation dtype before rotating.
    act = Q.dtype.element_ty
    c = tl.load(Cos + tok * stride_ct + offs_d, mask=mask_d, other=0.0).to(act).to(tl.float32)[None, :]
    s = tl.load(Sin + tok * stride_st + offs_d, mask=mask_d, other=0.0).to(act).to(tl.float32)[None, :]

    q_ptrs = Q + tok * stride_qt + offs_h[:, None] * stride_qh + offs_d[None, :]
    q1, q2 = _rotate(tl.load(q_ptrs, mask=mask_q), tl.load(q_ptrs + HALF, mask=mask_q), c, s)
    o_ptrs = Q_out + tok * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, q1, mask=mask_q)  # every load of this token is done: in place is safe
    tl.store(o_ptrs + HALF, q2, mask=mask_q)

    slot = tl.load(Slots + tok).to(tl.int64)
    k_ptrs = K + tok * stride_kt + offs_kh[:, None] * stride_kh + offs_d[None, :]
    k1, k2 = _rotate(tl.load(k_ptrs, mask=mask_kv), tl.load(k_ptrs + HALF, mask=mask_kv), c, s)
    cache_offs = slot * stride_cache_slot + offs_kh[:, None] * stride_cache_h + offs_d[None, :]
    tl.store(K_cache + cache_offs, k1.to(K_cache.dtype.element_ty), mask=mask_kv)
    tl.store(K_cache + cache_offs + HALF, k2.to(K_cache.dtype.element_ty), mask=mask_kv)
    v_ptrs = V + tok * stride_vt + offs_kh[:, None] * stride_vh + offs_d[None, :]
    tl.store(V_cache + cache_offs, tl.load(v_ptrs, mask=mask_kv).to(V_cache.dtype.element_ty), mask=mask_kv)
    tl.store(V_cache + cache_offs + HALF, tl.load(v_ptrs + HALF, mask=mask_kv).to(V_cache.dtype.element_ty),
             mask=mask_kv)


def _launch_rope_store(q, k, v, cos, sin, k_flat, v_flat, slot_mapping, out) -> None:
    t, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    half_pad = triton.next_power_of_2(head_dim // 2)
    heads_pad = triton.next_power_of_2(num_heads)
    _rope_store_kernel[(t,)](
        q, k, v, cos, sin, k_flat, v_flat, slot_mapping, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), sin.stride(0),
        k_flat.stride(0), k_flat.stride(1), out.stride(0), out.stride(1),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2, HEADS_PAD=heads_pad,
        KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HALF_PAD=half_pad,
        num_warps=_num_warps(heads_pad * half_pad),
        enable_fp_fusion=False)  # no fma(x1, cos, -x2 * sin): eager torch rounds each product (fp32 too)


def _check_rope_inputs(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, out) -> None:
    assert q.dim() == 3 and k.dim() == 3 and k.shape == v.shape, "q [T, Hq, D]; k, v [T, Hkv, D]"
    t, _, head_dim = q.shape
    assert k.shape[0] == t and k.shape[2] == head_dim and head_dim % 2 == 0, f"k {tuple(k.shape)}, q {tuple(q.shape)}"
    assert cos.shape == sin.shape == (t, head_dim // 2), f"cos/sin {tuple(cos.shape)}: want [T, D/2]"
    assert k_cache.shape == v_cache.shape and k_cache.dim() == 4, "caches [pages, page_size, Hkv, D], one shape"
    assert tuple(k_cache.shape[-2:]) == tuple(k.shape[1:]), f"cache {tuple(k_cache.shape)}, k {tuple(k.shape)}"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous (flat slots)"
    assert q.dtype in _DTYPES and k.dtype == q.dtype and v.dtype == q.dtype, "q, k, v of one dtype"
    assert cos.dtype in _DTYPES and sin.dtype == cos.dtype, "cos, sin of one float dtype"
    assert slot_mapping.shape == (t,) and not slot_mapping.is_floating_point(), "slot_mapping [T] integers"
    assert out.shape == q.shape and out.dtype == q.dtype, "out must look like q"
    for x in (q, k, v, cos, sin, out):
        assert x.stride(-1) == 1, "the last dim must be contiguous"
    _check_device(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, out)


def rope_and_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """RoPE on q and k, and rotated k and v written to the paged caches, in one launch.

    q [T, Hq, D], k and v [T, Hkv, D] (strided views of a fused qkv output are
    fine); cos, sin [T, D/2] (any float dtype, cast to q's first, as HF does);
    k_cache, v_cache [num_pages, page_size, Hkv, D] contiguous, written at the flat
    slots `slot_mapping` [T].  Returns the rotated q, written into `out` (which
    may be q itself) or a new tensor.  Equals `reference.rope_and_store_kv_reference`.
    """
    out = _empty(q.shape, q.dtype, q.device) if out is None else out
    _check_rope_inputs(q, k, v, cos, sin, k_cache, v_cache, slot_mapping, out)
    if q.shape[0]:
        k_flat = k_cache.view(-1, *k_cache.shape[-2:])
        _launch_rope_store(q, k, v, cos, sin, k_flat, v_cache.view(-1, *v_cache.shape[-2:]), slot_mapping, out)
    return out


# -------------------------------------------------------------------------------------------- silu_and_mul

@triton.jit
def _silu_and_mul_kernel(Gate_up, Out, n_cols, stride_g, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask_c = offs_c < n_cols
    gate = tl.load(Gate_up + row * stride_g + offs_c, mask=mask_c, other=0.0)
    up = tl.load(Gate_up + row * stride_g + n_cols + offs_c, mask=mask_c, other=0.0)
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # eager F.silu rounds before the product
    tl.store(Out + row * stride_o + offs_c, (silu.to(tl.float32) * up.to(tl.float32)).to(Out.dtype.element_ty),
             mask=mask_c)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] laid out [gate | up] -> silu(gate) * up [T, I], in one launch."""
    assert gate_up.dim() == 2 and gate_up.shape[1] % 2 == 0, f"gate_up {tuple(gate_up.shape)}: want [T, 2I]"
    assert gate_up.dtype in _DTYPES and gate_up.stride(1) == 1, f"{gate_up.dtype}, rows must be contiguous"
    _check_device(gate_up)
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = _empty((t, inter), gate_up.dtype, gate_up.device)
    block = min(_SILU_BLOCK, triton.next_power_of_2(inter))
    if t:
        _silu_and_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), out.stride(0),
                                                             BLOCK=block, num_warps=_num_warps(block))
    return out
