"""Prefill attention as dense variable-length calls: FlashAttention on the GPU, the reference elsewhere.

The rows of a step's prefill chunks attend (work list terms, reference.py) to
their own segment, causally, and fully to each shared prefix above them.
Measured on an H200 (benchmarks/bench_attention.py --prefill, 2026-12-02),
FlashAttention through torch ran that work 2.3x faster than our paged Triton
kernel (480-500 against 210 TFLOP/s at head_dim 128), whose strength is decode:
a prefix read once for a group's queries.  So a step's prefill rows take this
path and only its decode rows go to the paged kernel:

1. own segments: one varlen call, causal (bottom-right aligned: query i of a
   chunk of q_len rows over kv_len keys sees keys j <= kv_len - q_len + i),
   keys and values gathered from the pool by their flat slots;
2. shared prefixes, level by level (a row has at most one prefix per depth):
   one varlen call per depth over the rows below that depth's prefixes,
   non-causal, each prefix's keys gathered once for all its rows;
3. the partial outputs merge exactly by their log-sum-exp.

The gathers copy each needed key once per layer per step: for a 2048-token
prefix at llama-8b sizes 4 MiB, against tens of GFLOP of attention.  The flash
operator needs CUDA and fp16/bf16 (`flash_usable` checks it once against the
reference on random inputs); elsewhere `reference` computes the same segments
in float32 with `segment_attention`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .reference import segment_attention


@dataclass(frozen=True)
class DenseSegments:
    """One varlen call: segments of query rows, each against its own run of gathered keys.

    q_rows: [Q] int64 rows of the step's queries, segment after segment; cu_q, cu_k: [S+1] int32 offsets;
    kv_slots: [K] int64 flat pool slots (page * page_size + offset) of the keys, segment after segment.
    """

    q_rows: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    kv_slots: torch.Tensor
    max_q: int
    max_k: int
    causal: bool
    host_cu_q: tuple[int, ...]  # the same offsets on the host (the reference loops over them)
    host_cu_k: tuple[int, ...]


@dataclass(frozen=True)
class DensePrefill:
    """The prefill rows' attention: their own segments (causal), then one call per prefix depth."""

    own: DenseSegments
    prefixes: tuple[DenseSegments, ...]


def dense_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, work: DensePrefill,
                            sm_scale: float, out: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Write the attention of the prefill rows of q [T, Hq, D] into out (rows of `work.own.q_rows`).

    k_cache, v_cache: [num_pages, page_size, Hkv, D].  impl: "flash", "reference", or "auto" (flash where
    `flash_supported`).
    """
    use_flash = impl == "flash" or (impl == "auto" and flash_supported(q))
    run = _flash if use_flash else _reference
    keys, values = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # [slots, Hkv, D]
    acc, lse = run(q, keys, values, work.own, sm_scale)  # [Q, Hq, D] float32, [Q, Hq]
    position = _positions(work.own.q_rows, q.shape[0])
    for level in work.prefixes:
        part, part_lse = run(q, keys, values, level, sm_scale)
        at = position[level.q_rows]
        merged = torch.logaddexp(lse[at], part_lse)
        acc[at] = acc[at] * torch.exp(lse[at] - merged)[..., None] + part * torch.exp(part_lse - merged)[..., None]
        lse[at] = merged
    out[work.own.q_rows] = acc.to(out.dtype)
    return out


def _positions(rows: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Inverse of the own call's row list: position[row] = index of that row in it."""
    position = torch.zeros(num_rows, dtype=torch.int64, device=rows.device)
    position[rows] = torch.arange(rows.numel(), device=rows.device)
    return position


def _flash(q, keys, values, seg: DenseSegments, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    qs = q.index_select(0, seg.q_rows)
    k = keys.index_select(0, seg.kv_slots)
    v = values.index_select(0, seg.kv_slots)
    out, lse, *_ = torch.ops.aten._flash_attention_forward(
        qs, k, v, seg.cu_q, seg.cu_k, seg.max_q, seg.max_k, 0.0, seg.causal, False, scale=sm_scale)
    lse = lse.reshape(q.shape[1], -1).transpose(0, 1) if lse.shape[0] == q.shape[1] else lse.reshape(-1, q.shape[1])
    return out.float(), lse.float()


def _reference(q, keys, values, seg: DenseSegments, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    outs, lses = [], []
    cu_q, cu_k = seg.host_cu_q, seg.host_cu_k
    for i in range(len(cu_q) - 1):
        rows = seg.q_rows[cu_q[i]:cu_q[i + 1]]
        slots = seg.kv_slots[cu_k[i]:cu_k[i + 1]]
        out, lse = segment_attention(q[rows], keys[slots], values[slots], seg.causal, sm_scale)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def flash_supported(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


_checked: dict[tuple, bool] = {}


def flash_usable(device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the flash path runs here and gives the reference's result (checked once per shape and dtype:
    a mixed batch of causal chunks below two prefix levels, random inputs)."""
    key = (str(device), dtype, num_heads, num_kv_heads, head_dim)
    if key not in _checked:
        _checked[key] = _check_flash(device, dtype, num_heads, num_kv_heads, head_dim)
    return _checked[key]


def _check_flash(device, dtype, num_heads, num_kv_heads, head_dim) -> bool:
    probe = torch.empty(0, dtype=dtype, device=device)
    if not flash_supported(probe) or not hasattr(torch.ops.aten, "_flash_attention_forward"):
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    slots, rows = 4096, 96
    k = torch.randn(slots, 1, num_kv_heads, head_dim, dtype=dtype, device=device, generator=gen)
    v = torch.randn(slots, 1, num_kv_heads, head_dim, dtype=dtype, device=device, generator=gen)
    q = torch.randn(rows + 8, num_heads, head_dim, dtype=dtype, device=device, generator=gen)
    work = _probe_work(device, rows)
    scale = 1 / math.sqrt(head_dim)
    try:
        got = dense_prefill_attention(q, k, v, work, scale, torch.zeros_like(q), impl="flash")
    except (RuntimeError, NotImplementedError):
        return False
    want = dense_prefill_attention(q.float(), k.float(), v.float(), work, scale, torch.zeros_like(q, dtype=torch.float32),
                                   impl="reference")
    sel = work.own.q_rows
    err = ((got[sel].float() - want[sel]).norm() / want[sel].norm()).item()
    return err < 2e-2


def _probe_work(device, rows: int) -> DensePrefill:
    """Rows 8.. in three chunks of 40, 40, 8 tokens (own segments of 40, 300, 16 keys); the first two below
    prefix A (200 keys), the first below prefix B too (a second level, 120 keys)."""
    def seg(q_rows, q_lens, k_slots, causal):
        cu_q = [0]
        for n in q_lens:
            cu_q.append(cu_q[-1] + n)
        cu_k = [0]
        for s in k_slots:
            cu_k.append(cu_k[-1] + len(s))
        flat = [x for s in k_slots for x in s]
        as_t = lambda xs, dt: torch.tensor(xs, dtype=dt, device=device)  # noqa: E731
        return DenseSegments(as_t(q_rows, torch.int64), as_t(cu_q, torch.int32), as_t(cu_k, torch.int32),
                             as_t(flat, torch.int64), max(q_lens), max(map(len, k_slots)), causal,
                             tuple(cu_q), tuple(cu_k))
    chunks = [(8, 40, 40), (48, 40, 300), (88, 8, 16)]
    own = seg([r for r0, n, _ in chunks for r in range(r0, r0 + n)], [n for _, n, _ in chunks],
              [list(range(1000 + 400 * i, 1000 + 400 * i + kv)) for i, (_, _, kv) in enumerate(chunks)], True)
    level_a = seg(list(range(8, 88)), [80], [list(range(0, 200))], False)
    level_b = seg(list(range(8, 48)), [40], [list(range(300, 420))], False)
    return DensePrefill(own, (level_a, level_b))
