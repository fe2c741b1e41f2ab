"""Fused prefix-shared paged attention (Triton): the whole step's attention in one launch.

Algorithm (BatchLLM, arXiv 2412.03594, section 4).  The work list says which
query rows attend to which KV segment (reference.py).  `attention_plan` cuts it
into tiles; one program computes one tile for one KV head:

* its matrix side packs the tile's query rows times the query heads sharing the
  KV head (GQA, any ratio), so a prefix group's decode queries are one `tl.dot`
  operand and the prefix KV is read once per group, on the tensor cores;
* it walks its keys BLOCK_N at a time through the page table (any power-of-two
  page size), with the online softmax of flash attention in base 2; the blocks
  that every row of the tile sees whole run without masks, the last ones (the
  segment's ragged end, the causal diagonal) with them (SPLIT_MASKED);
* a tile whose rows it alone covers writes the output; any other writes its
  normalised partial and log-sum-exp to a scratch row.

Prefix tiles (many rows, non-causal), decode suffix tiles (one row), split-K
pieces of long prefixes and causal prefill chunks (CAUSAL) are two tile classes,
small (SMALL_M packed rows) and big (BIG_M): two instantiations of one tile
function, one launch per class with its own launch settings (`TileConfig`).
A decode suffix tile streams its KV once with little arithmetic: at head_dim 64
it runs with 2 warps, so that many programs share an SM; at head_dim 128 with 4
(`small_tile_config`: measured as CUDA graph replays of decode steps on an H200,
2026-12-03; an eager timing of 2026-12-02 that favoured 2 warps included the
launches' host time).  A big tile needs the warps for its matrix products.  A second,
small launch merges the partials of each row exactly by their log-sum-exp.

Program order (HEADS_ADJACENT): a 1-D grid whose index runs over the KV heads fastest, so the programs of
one tile's heads run side by side and read each page row, where all heads lie contiguously, together
(measured on an H200, 2026-12-03: decode steps up to 18% faster than one head's tiles after another).

CUDA graphs (FIXED_GRID): a captured launch cannot change its grid, and the
launcher cannot read the step's work list then.  `bind_plan` gives a work list a
fixed-grid plan over static buffers (attention_plan.FixedPlanLayout): both
launches take capacity grids, and programs past the step's tile and merge-row
counts, read from the device, do nothing.  The same kernels, one flag.

Limits: head_dim a power of two from 16 to 256 (the engine sends 64 and 128;
others fall back to the reference with a warning), q and the caches of one
dtype (fp16, bf16 or fp32; fp32 dots are exact, not tf32), the page size a power
of two, the GQA ratio at most 128.  The plan is built on the host, from
the work list's host copy where it has one (else one device-to-host copy per
step), and cached for the step's layers.
"""
from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import attention_plan as ap
from .reference import AttentionWork, paged_attention_reference

_BLOCK_N = 64  # keys per step of a small tile (the split-K planner sizes splits in these blocks)


@dataclass(frozen=True)
class TileConfig:
    """Launch settings of one tile class: keys per step, warps, software-pipeline stages."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


SMALL_TILE = TileConfig(block_n=_BLOCK_N, num_warps=2, num_stages=2)  # decode suffixes
# Per head_dim overrides of SMALL_TILE.  head_dim 128 (llama-8b's heads), decode steps of the standard workloads
# replayed as CUDA graphs on an H200 (benchmarks/decode_attention_sweep.py, 2026-12-03): 4 warps reach 52-83% of
# the copy floor against 49-77% with 2; at head_dim 64 no setting moved it by more than the noise.
SMALL_TILE_CONFIGS: dict[int, TileConfig] = {128: TileConfig(block_n=_BLOCK_N, num_warps=4, num_stages=2)}
# Big tiles by their rows: 128 (prefill chunks, big groups of eager plans) and 64 (decode plans' prefix groups).
BIG_TILES = {128: TileConfig(block_n=64, num_warps=8, num_stages=3), 64: TileConfig(block_n=64, num_warps=4)}
# Per head_dim overrides of the 128-row config, from bench_attention.py --prefill on an H200 (2026-12-04, whole
# blocks unmasked): at head_dim 128 32-key steps with 4 warps were 4-13% faster than (64, 8, 3) on all three prefill
# shapes; at 64, two stages instead of three were as fast on the shared prefixes and a third faster unshared.
BIG_TILE_CONFIGS: dict[int, TileConfig] = {128: TileConfig(block_n=32, num_warps=4, num_stages=3),
                                           64: TileConfig(block_n=64, num_warps=8, num_stages=2)}


# The programs of one tile's KV heads side by side (see _paged_attention_kernel); False: one head's tiles after
# another, the order before 2026-12-03 (benchmarks/decode_attention_sweep.py compares both).
HEADS_ADJACENT = True

# Masks only where a block needs them: a tile's whole blocks of keys that every row sees run without bounds checks
# or causal masks, its last blocks (the ragged end, the causal diagonal) with them, as flash attention does.
# False: every block masked, the kernel before 2026-12-04 (bench_attention.py --prefill compares both).
SPLIT_MASKED = True


def small_tile_config(head_dim: int) -> TileConfig:
    return SMALL_TILE_CONFIGS.get(head_dim, SMALL_TILE)


def big_tile_config(head_dim: int, big_m: int = 128) -> TileConfig:
    if big_m >= 128 and head_dim in BIG_TILE_CONFIGS:
        return BIG_TILE_CONFIGS[head_dim]
    return BIG_TILES[128 if big_m >= 128 else 64]


@triton.jit
def _attend_block(q, k_base, v_base, Page_ids, page_start, start, kv_end, causal_shift, local_row, acc, l_i, m_i,
                  qk_scale, stride_kp, stride_kt, stride_vp, stride_vt, PAGE_SIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """One step of the online softmax: keys [start, start + BLOCK_N) of the segment, through the page table.

    MASKED: the block may hold keys past the segment's end or past a row's causal limit, so its loads are
    bounded and its scores masked; an unmasked block (every key visible to every row) skips both."""
    offs_kv = start + tl.arange(0, BLOCK_N)
    slot = offs_kv % PAGE_SIZE
    if MASKED:
        mask_n = offs_kv < kv_end
        page = tl.load(Page_ids + page_start + offs_kv // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(k_base + (page * stride_kp + slot * stride_kt)[:, None], mask=mask_n[:, None], other=0.0)
        v = tl.load(v_base + (page * stride_vp + slot * stride_vt)[:, None], mask=mask_n[:, None], other=0.0)
    else:
        page = tl.load(Page_ids + page_start + offs_kv // PAGE_SIZE).to(tl.int64)
        k = tl.load(k_base + (page * stride_kp + slot * stride_kt)[:, None])
        v = tl.load(v_base + (page * stride_vp + slot * stride_vt)[:, None])
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        visible = mask_n[None, :]
        if CAUSAL:
            visible = visible & (offs_kv[None, :] <= causal_shift + local_row[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no visible key yet
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_base = m_new
    p = tl.math.exp2(s - m_base[:, None])
    alpha = tl.math.exp2(m_i - m_base)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit
def _attend_range(q, k_base, v_base, Page_ids, page_start, lo, hi, kv_end, causal_shift, local_row, acc, l_i, m_i,
                  qk_scale, stride_kp, stride_kt, stride_vp, stride_vt, PAGE_SIZE: tl.constexpr,
                  BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, MASKED: tl.constexpr,
                  INTERPRET: tl.constexpr):
    """The blocks starting in [lo, hi), BLOCK_N keys apart."""
    if INTERPRET:  # the interpreter cannot range() over loaded scalars (numpy >= 2)
        start = lo
        while start < hi:
            acc, l_i, m_i = _attend_block(q, k_base, v_base, Page_ids, page_start, start, kv_end, causal_shift,
                                          local_row, acc, l_i, m_i, qk_scale, stride_kp, stride_kt, stride_vp,
                                          stride_vt, PAGE_SIZE, BLOCK_N, CAUSAL, DOT_PRECISION, MASKED)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            acc, l_i, m_i = _attend_block(q, k_base, v_base, Page_ids, page_start, start, kv_end, causal_shift,
                                          local_row, acc, l_i, m_i, qk_scale, stride_kp, stride_kt, stride_vp,
                                          stride_vt, PAGE_SIZE, BLOCK_N, CAUSAL, DOT_PRECISION, MASKED)
    return acc, l_i, m_i


@triton.jit
def _attend_tile(Q, K_cache, V_cache, Out, Part_o, Part_lse, Page_ids,
                 row0, n_rows, kv_start, kv_end, causal_shift, page_start, part_base, kv_head, qk_scale,
                 stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                 stride_ot, stride_oh, stride_pp, stride_ph, stride_lp,
                 GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                 SPLIT_MASKED: tl.constexpr):
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    local_row = offs_m // GROUP  # packed row m = (query row, query head of this KV head)
    head = kv_head * GROUP + offs_m % GROUP
    mask_m = local_row < n_rows
    q = tl.load(Q + (row0 + local_row)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K_cache + kv_head * stride_kh + offs_d[None, :]
    v_base = V_cache + kv_head * stride_vh + offs_d[None, :]
    # Keys up to the first row's causal limit are visible to every row of the tile: whole blocks of them run
    # unmasked (SPLIT_MASKED), the rest (the segment's ragged end, the causal diagonal) masked.
    if SPLIT_MASKED:
        full_end = kv_end
        if CAUSAL:
            full_end = tl.minimum(kv_end, causal_shift + 1)
        full_end = kv_start + tl.maximum(full_end - kv_start, 0) // BLOCK_N * BLOCK_N
        acc, l_i, m_i = _attend_range(q, k_base, v_base, Page_ids, page_start, kv_start, full_end, kv_end,
                                      causal_shift, local_row, acc, l_i, m_i, qk_scale, stride_kp, stride_kt,
                                      stride_vp, stride_vt, PAGE_SIZE, BLOCK_N, CAUSAL, DOT_PRECISION, False,
                                      INTERPRET)
    else:
        full_end = kv_start
    acc, l_i, m_i = _attend_range(q, k_base, v_base, Page_ids, page_start, full_end, kv_end, kv_end,
                                  causal_shift, local_row, acc, l_i, m_i, qk_scale, stride_kp, stride_kt,
                                  stride_vp, stride_vt, PAGE_SIZE, BLOCK_N, CAUSAL, DOT_PRECISION, True, INTERPRET)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    if part_base < 0:
        o_ptrs = Out + (row0 + local_row)[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=mask_m[:, None])
    else:
        part = (part_base + local_row).to(tl.int64)
        tl.store(Part_o + part[:, None] * stride_pp + head[:, None] * stride_ph + offs_d[None, :], out,
                 mask=mask_m[:, None])
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
        tl.store(Part_lse + part * stride_lp + head, lse, mask=mask_m)


@triton.jit
def _tile_program(Q, K_cache, V_cache, Out, Part_o, Part_lse, Page_ids, tile, kv_head, qk_scale,
                  stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                  stride_ot, stride_oh, stride_pp, stride_ph, stride_lp,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                  SMALL_M: tl.constexpr, BIG_M: tl.constexpr, SMALL_N: tl.constexpr, BIG_N: tl.constexpr,
                  CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRET: tl.constexpr,
                  TILE_CLASS: tl.constexpr, SPLIT_MASKED: tl.constexpr):
    """One tile of the table for one KV head: its fields, then the big (TILE_CLASS 2) or small (1) tile function."""
    row0 = tl.load(tile + 0)
    n_rows = tl.load(tile + 1)
    kv_start = tl.load(tile + 2)
    kv_end = tl.load(tile + 3)
    causal_shift = tl.load(tile + 4)
    page_start = tl.load(tile + 5)
    part_base = tl.load(tile + 6)
    if TILE_CLASS == 2:
        _attend_tile(Q, K_cache, V_cache, Out, Part_o, Part_lse, Page_ids, row0, n_rows, kv_start, kv_end,
                     causal_shift, page_start, part_base, kv_head, qk_scale,
                     stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                     stride_ot, stride_oh, stride_pp, stride_ph, stride_lp,
                     GROUP, HEAD_DIM, PAGE_SIZE, BIG_M, BIG_N, CAUSAL, DOT_PRECISION, INTERPRET, SPLIT_MASKED)
    else:
        _attend_tile(Q, K_cache, V_cache, Out, Part_o, Part_lse, Page_ids, row0, n_rows, kv_start, kv_end,
                     causal_shift, page_start, part_base, kv_head, qk_scale,
                     stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                     stride_ot, stride_oh, stride_pp, stride_ph, stride_lp,
                     GROUP, HEAD_DIM, PAGE_SIZE, SMALL_M, SMALL_N, CAUSAL, DOT_PRECISION, INTERPRET, SPLIT_MASKED)


@triton.jit
def _paged_attention_kernel(Q, K_cache, V_cache, Out, Part_o, Part_lse, Page_ids, Tiles, Counts, qk_scale,
                            stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                            stride_ot, stride_oh, stride_pp, stride_ph, stride_lp,
                            GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
                            SMALL_M: tl.constexpr, BIG_M: tl.constexpr, SMALL_N: tl.constexpr, BIG_N: tl.constexpr,
                            CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, TILE_FIELDS: tl.constexpr,
                            FIXED_GRID: tl.constexpr, INTERPRET: tl.constexpr, TILE_CLASS: tl.constexpr,
                            NUM_KV_HEADS: tl.constexpr, HEADS_ADJACENT: tl.constexpr, SPLIT_MASKED: tl.constexpr):
    """Grid: (tiles of one class) x (KV heads) programs.  HEADS_ADJACENT: a 1-D grid whose index runs over the KV
    heads fastest, so the programs of one tile's heads run side by side and read its pages' K and V rows, which
    hold all heads contiguously, together; else a 2-D grid (tile, head), one head's tiles after another.
    FIXED_GRID (a CUDA graph's launch): Tiles is the whole table, the grid a capacity; Counts (on the device)
    holds the step's tiles [0] and big tiles [2]; big tiles come first.  Programs past their class's tiles do
    nothing."""
    if HEADS_ADJACENT:
        pid = tl.program_id(0)
        kv_head = pid % NUM_KV_HEADS
        local_idx = pid // NUM_KV_HEADS
    else:
        kv_head = tl.program_id(1)
        local_idx = tl.program_id(0)
    if FIXED_GRID:
        if TILE_CLASS == 2:
            tile_idx = local_idx
            end = tl.load(Counts + 2)
        else:
            tile_idx = tl.load(Counts + 2) + local_idx
            end = tl.load(Counts)
        tile = Tiles + tile_idx * TILE_FIELDS
        if tile_idx < end:
            _tile_program(Q, K_cache, V_cache, Out, Part_o, Part_lse, Page_ids, tile, kv_head, qk_scale,
                          stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                          stride_ot, stride_oh, stride_pp, stride_ph, stride_lp, GROUP, HEAD_DIM, PAGE_SIZE,
                          SMALL_M, BIG_M, SMALL_N, BIG_N, CAUSAL, DOT_PRECISION, INTERPRET, TILE_CLASS,
                          SPLIT_MASKED)
    else:
        tile = Tiles + local_idx * TILE_FIELDS
        _tile_program(Q, K_cache, V_cache, Out, Part_o, Part_lse, Page_ids, tile, kv_head, qk_scale,
                      stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                      stride_ot, stride_oh, stride_pp, stride_ph, stride_lp, GROUP, HEAD_DIM, PAGE_SIZE,
                      SMALL_M, BIG_M, SMALL_N, BIG_N, CAUSAL, DOT_PRECISION, INTERPRET, TILE_CLASS,
                          SPLIT_MASKED)


@triton.jit
def _merge_row(Out, Part_o, Part_lse, Merge_rows, Merge_ptr, Merge_parts, idx,
               stride_ot, stride_oh, stride_pp, stride_ph, stride_lp,
               NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Merge row `idx` of the lists: all its partials, all heads, combined by log-sum-exp (base 2)."""
    row = tl.load(Merge_rows + idx)
    first = tl.load(Merge_ptr + idx)
    last = tl.load(Merge_ptr + idx + 1)
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_h = offs_h < NUM_HEADS
    m_i = tl.full([HEADS_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([HEADS_PAD], tl.float32)
    acc = tl.zeros([HEADS_PAD, HEAD_DIM], tl.float32)
    i = first
    while i < last:  # a handful of partials: no pipelining to lose, and the interpreter can run it
        part = tl.load(Merge_parts + i).to(tl.int64)
        i += 1
        lse = tl.load(Part_lse + part * stride_lp + offs_h, mask=mask_h, other=float("-inf"))
        o = tl.load(Part_o + part * stride_pp + offs_h[:, None] * stride_ph + offs_d[None, :],
                    mask=mask_h[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_base)
        w = tl.math.exp2(lse - m_base)
        acc = acc * alpha[:, None] + o * w[:, None]
        l_i = l_i * alpha + w
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + row * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask_h[:, None])


@triton.jit
def _merge_kernel(Out, Part_o, Part_lse, Merge_rows, Merge_ptr, Merge_parts, Counts,
                  stride_ot, stride_oh, stride_pp, stride_ph, stride_lp,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  FIXED_GRID: tl.constexpr):
    """One program per merge row.  FIXED_GRID: programs at or past Counts[1] (the step's merge rows) do nothing."""
    idx = tl.program_id(0)
    if FIXED_GRID:
        if idx < tl.load(Counts + 1):
            _merge_row(Out, Part_o, Part_lse, Merge_rows, Merge_ptr, Merge_parts, idx, stride_ot, stride_oh,
                       stride_pp, stride_ph, stride_lp, NUM_HEADS, HEADS_PAD, HEAD_DIM)
    else:
        _merge_row(Out, Part_o, Part_lse, Merge_rows, Merge_ptr, Merge_parts, idx, stride_ot, stride_oh,
                   stride_pp, stride_ph, stride_lp, NUM_HEADS, HEADS_PAD, HEAD_DIM)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


# Both hold a plan (device tensors) only while its work list lives: a weak reference's callback drops the entry
# when the work dies.  An entry left behind would keep its tensors, and with them the whole allocator segment they
# were carved from: on an H200 a dropped engine's 58 GiB K cache stayed reserved that way (2026-12-04).
_plan_cache: dict = {}  # "last" -> (weakref to the last work list seen, key, plan): every layer of a step shares it
_bound_plans: dict = {}  # id(work) -> (weakref to work, plan): see bind_plan and attach_plan


def _forget(table: dict, key) -> Callable[[weakref.ref], None]:
    """A weakref callback that removes table[key] if it still belongs to the reference that died."""
    def callback(ref: weakref.ref) -> None:
        entry = table.get(key)
        if entry is not None and entry[0] is ref:
            del table[key]
    return callback


def host_plan(work: AttentionWork, num_rows: int, num_heads: int, num_kv_heads: int,
              device: torch.device, split: bool = False) -> ap.HostPlan:
    """The plan for `work` (num_rows query rows, on `device`), left on the host.

    `work` may live on the CPU: a graph's step plans from the host lists, with no device round trip.
    split: 128-row big tiles where items are that long (what the launcher plans for an unbound work list);
    else at most 64 rows, the one variant a CUDA graph captures for decode steps.
    """
    big_m_max = ap.SPLIT_BIG_M if split else ap.BIG_M_MAX
    return ap.plan_on_host(work, num_rows, num_heads // num_kv_heads, num_kv_heads, _num_sms(device), _BLOCK_N,
                           big_m_max)


def fixed_plan_layout(max_rows: int, num_kv_heads: int, device: torch.device) -> ap.FixedPlanLayout:
    """Room for the fixed-grid plans of decode steps of up to max_rows rows.

    Split-K aims at PROGRAMS_PER_SM programs per SM over all KV heads; a split rounds up
    to a power of two, and each row adds a suffix tile and its share of prefix tiles:
    the plans of real decode steps stay well inside.  A step that needs more runs eagerly.
    """
    max_tiles = 4 * max_rows + 2 * ap.PROGRAMS_PER_SM * _num_sms(device) // num_kv_heads + 64
    return ap.FixedPlanLayout(max_tiles, max_rows, 2 * max_tiles + 4 * max_rows)


def bind_plan(work: AttentionWork, plan: ap.AttentionPlan) -> None:
    """Launch `work` with `plan` from now on (a fixed-grid plan over static buffers, for CUDA graph capture).

    The launcher then reads no work list and builds no plan for it: no host synchronisation, no pointer
    that changes between steps.  Only `work.page_ids` is read, by the kernel.  The binding lasts while
    `work` lives.
    """
    assert plan.counts is not None, "bind a fixed-grid plan (FixedPlanLayout.device_plan)"
    attach_plan(work, plan)


def attach_plan(work: AttentionWork, plan: ap.AttentionPlan) -> None:
    """Launch `work` with `plan`, made by the caller (the engine plans each step on the host and sends the
    plan with the step's other inputs in one copy), instead of planning it here.  Lasts while `work` lives."""
    _bound_plans[id(work)] = (weakref.ref(work, _forget(_bound_plans, id(work))), plan)


def _plan_for(work: AttentionWork, q: torch.Tensor, num_kv_heads: int) -> ap.AttentionPlan:
    bound = _bound_plans.get(id(work))
    if bound is not None and bound[0]() is work:
        return bound[1]
    key = (q.shape[0], q.shape[1], num_kv_heads, q.device, ap.PROGRAMS_PER_SM, ap.BIG_M_MAX)
    cached = _plan_cache.get("last")
    if cached is not None and cached[0]() is work and cached[1] == key:
        return cached[2]
    plan = ap.build_plan(work, q.shape[0], q.shape[1] // num_kv_heads, num_kv_heads, _num_sms(q.device),
                         _BLOCK_N, q.device, ap.SPLIT_BIG_M)
    _plan_cache["last"] = (weakref.ref(work, _forget(_plan_cache, "last")), key, plan)
    return plan


def _empty(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(q, k_cache, v_cache, work, sm_scale, out) -> torch.Tensor:
    """The big-tile launch, the small-tile launch, and (when needed) the merge launch."""
    t, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    plan = _plan_for(work, q, num_kv_heads)
    part_o = _empty((max(plan.num_parts, 1), num_heads, head_dim), torch.float32, q.device)
    part_lse = _empty((max(plan.num_parts, 1), num_heads), torch.float32, q.device)
    fixed = plan.counts is not None
    counts = plan.counts if fixed else plan.tiles  # an unused pointer must still be a tensor
    # Eager: each launch gets its slice of the table.  Fixed grid: both read the whole table, a capacity grid
    # each (num_big and num_tiles), and the kernel finds its class's tiles from the counts on the device.
    num_small = plan.num_tiles if fixed else plan.num_tiles - plan.num_big
    small_tiles = plan.tiles if fixed else plan.tiles[plan.num_big:]
    big = big_tile_config(head_dim, plan.big_m)
    if plan.num_big:
        _tile_launch(q, k_cache, v_cache, work, sm_scale, out, part_o, part_lse, plan, plan.tiles, counts,
                     plan.num_big, 2, big)
    if num_small > 0:
        _tile_launch(q, k_cache, v_cache, work, sm_scale, out, part_o, part_lse, plan, small_tiles, counts,
                     num_small, 1, small_tile_config(head_dim))
    if plan.num_merge_rows:
        _merge_kernel[(plan.num_merge_rows,)](
            out, part_o, part_lse, plan.merge_rows, plan.merge_ptr, plan.merge_parts, counts,
            out.stride(0), out.stride(1), part_o.stride(0), part_o.stride(1), part_lse.stride(0),
            NUM_HEADS=num_heads, HEADS_PAD=triton.next_power_of_2(num_heads), HEAD_DIM=head_dim,
            FIXED_GRID=fixed, num_warps=4)
    return out


def _tile_launch(q, k_cache, v_cache, work, sm_scale, out, part_o, part_lse, plan, tiles, counts, num_tiles,
                 tile_class, config: TileConfig) -> None:
    """One launch of the tile kernel over `num_tiles` programs of one class (2: big, 1: small)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    fp32 = q.dtype == torch.float32
    shrink = 2 if fp32 and head_dim > 64 else 1  # fp32 tiles take twice the registers and shared memory
    block_n = max(16, config.block_n // shrink)
    fixed = plan.counts is not None
    grid = (num_tiles * num_kv_heads,) if HEADS_ADJACENT else (num_tiles, num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, part_o, part_lse, work.page_ids, tiles, counts,
        sm_scale * 1.4426950408889634,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        part_o.stride(0), part_o.stride(1), part_lse.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, PAGE_SIZE=page_size, SMALL_M=plan.small_m,
        BIG_M=plan.big_m, SMALL_N=block_n, BIG_N=block_n, CAUSAL=plan.has_causal,
        DOT_PRECISION="ieee" if fp32 else "tf32", TILE_FIELDS=ap.TILE_FIELDS, FIXED_GRID=fixed,
        INTERPRET=_interpreting(), TILE_CLASS=tile_class, NUM_KV_HEADS=num_kv_heads, HEADS_ADJACENT=HEADS_ADJACENT,
        SPLIT_MASKED=SPLIT_MASKED, num_warps=config.num_warps, num_stages=config.num_stages)


_warned_fallback: set = set()


def supported_head_dim(head_dim: int) -> bool:
    """Whether the kernel takes this head_dim (others run the torch reference)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, work: AttentionWork) -> None:
    """Assert shapes, strides, dtypes and devices (shared with extend_attention)."""
    assert q.dim() == 3 and k_cache.dim() == 4, "q [T, Hq, D], caches [pages, page_size, Hkv, D]"
    assert k_cache.shape == v_cache.shape, "k_cache and v_cache differ in shape"
    t, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, cache_dim = k_cache.shape
    assert cache_dim == head_dim, f"head_dim of q ({head_dim}) and the cache ({cache_dim}) differ"
    assert num_heads % num_kv_heads == 0, f"{num_heads} query heads over {num_kv_heads} KV heads"
    assert num_heads // num_kv_heads <= 128, "GQA ratio above 128"
    assert page_size & (page_size - 1) == 0, f"page size {page_size} is not a power of two"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"dtype {q.dtype}"
    assert k_cache.dtype == q.dtype and v_cache.dtype == q.dtype, "q and the caches must share a dtype"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head_dim must be contiguous"
    on_gpu = q.is_cuda or _interpreting()
    assert on_gpu, "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU)"
    assert k_cache.device == q.device and work.page_ids.device == q.device, "tensors on different devices"
    assert work.page_ids.dtype == torch.int32, "page_ids must be int32"


def run_paged_attention(q, k_cache, v_cache, work, sm_scale, out=None) -> torch.Tensor:
    """Shared entry of both public functions: checks, fallback for odd head_dims, launch."""
    check_inputs(q, k_cache, v_cache, work)
    if not supported_head_dim(q.shape[2]):
        if q.shape[2] not in _warned_fallback:
            _warned_fallback.add(q.shape[2])
            warnings.warn(f"head_dim {q.shape[2]}: no Triton kernel, using the torch reference", stacklevel=3)
        result = paged_attention_reference(q, k_cache, v_cache, work, sm_scale)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1, "out must look like q"
    if q.shape[0] == 0:
        return out
    return _launch(q, k_cache, v_cache, work, sm_scale, out)


def fused_paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, work: AttentionWork,
                          sm_scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """The whole step's attention, as `paged_attention_reference` computes it, in two launches.

    q [T, Hq, D]; k_cache, v_cache [num_pages, page_size, Hkv, D] (same dtype as q);
    work: the step's work list, int32 tensors on q's device.  Returns out [T, Hq, D]
    (written into `out` when given).  Prefix groups, decode suffixes and causal prefill
    chunks may be mixed freely.
    """
    return run_paged_attention(q, k_cache, v_cache, work, sm_scale, out)
