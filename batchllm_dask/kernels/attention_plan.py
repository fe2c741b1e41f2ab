"""The tile plan of one step's attention: what each program of the fused kernel computes.

The work list (`AttentionWork`) says which query rows attend to which KV
segment.  The plan cuts it into *tiles*, the unit one program computes for one
KV head:

    tile = (rows [row0, row0 + n_rows) of one item) x (keys [kv_start, kv_end) of its segment)

* Query blocking: a tile's matrix side packs `n_rows` query rows times the
  `group` query heads that share a KV head (GQA), so a prefix group's decode
  queries form one `tl.dot` operand and the prefix is read once per group.
  Two tile classes: small tiles (`small_m` = 16 packed rows, a decode suffix)
  and big tiles (`big_m`, a prefix group or a prefill chunk).  Big tiles are
  listed first and each class has a launch of its own with its own warps and
  pipeline stages (prefix_attention.py): prefill attention needs the big
  tile's arithmetic, while a decode suffix is a stream of KV bytes that runs
  best with few warps per program and many programs per SM.  A decode-only
  plan (a CUDA graph's) keeps big tiles at 64 rows; a plan with long query
  items (prefill chunks, `big_m_max` 128) gets 128-row big tiles.
* Causal clipping: a causal tile's keys stop after its last row's last visible
  key, so prefill chunks do no work on the masked triangle's far side.
* Split-K: a segment's keys are cut into splits of `split_len`, chosen so the
  launch has a few programs per SM even when a batch has few prefix groups.
* Merge: a row covered by one tile only (a prefill chunk with no shared prefix
  and no split) is written straight to the output ("direct").  Every other
  tile writes a normalised partial and its log-sum-exp to a scratch row; the
  merge launch combines each row's partials, listed in CSR form.

Planning runs on the host with numpy (one device-to-host copy of the work
list), once per step: the launcher caches the plan of the last work list it
saw, so all layers of a step share it.  Tiles are sorted longest first, a
greedy longest-processing-time order for the hardware scheduler.

For a CUDA graph the plan is made on the host from host lists (`plan_on_host`)
and written into static buffers of fixed capacity (`FixedPlanLayout`): the
captured launches keep their grids and pointers, each step only its contents.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .reference import AttentionWork

# Columns of the int32 tile table.
ROW0, N_ROWS, KV_START, KV_END, CAUSAL_SHIFT, PAGE_START, PART_BASE, BIG = range(8)
TILE_FIELDS = 8
NO_CAUSAL = 2**30  # causal shift of a non-causal tile: every key is visible
PROGRAMS_PER_SM = 16  # split-K target: programs of equal work per SM (short tiles keep the tail short)
BIG_M_MAX = 64  # the big tile of decode-only plans (CUDA graphs: one compiled variant for every step)
SPLIT_BIG_M = 128  # the big tile of eager plans (steps with prefill chunks)


@dataclass(frozen=True)
class AttentionPlan:
    """Tiles and merge lists for one work list (tensors on the device of q).

    A *fixed-grid* plan (`counts` set, made by `FixedPlanLayout.device_plan` for a
    CUDA graph) has capacities in num_tiles, num_merge_rows and num_parts: the
    launches take those grids, and programs past the step's counts do nothing.
    """

    tiles: torch.Tensor  # [num_tiles, TILE_FIELDS] int32, see the column names above
    merge_rows: torch.Tensor  # [num_merge_rows] int32: rows that need the merge launch
    merge_ptr: torch.Tensor  # [num_merge_rows + 1] int32: CSR offsets into merge_parts
    merge_parts: torch.Tensor  # [num_parts] int32: scratch rows of each merge row's partials
    num_tiles: int
    num_parts: int
    num_merge_rows: int
    has_causal: bool  # some causal item has several rows (with one row, causal changes nothing)
    small_m: int
    big_m: int
    split_len: int
    counts: torch.Tensor | None = None  # [3] int32 (tiles, merge rows, big tiles) of a fixed-grid plan's step
    num_big: int = 0  # tiles [0, num_big) are big, the rest small (a fixed-grid plan: the big-tile grid)


@dataclass(frozen=True)
class HostPlan:
    """The same plan as numpy arrays on the host, before it goes to the device."""

    tiles: np.ndarray  # [num_tiles, TILE_FIELDS] int64
    merge_rows: np.ndarray
    merge_ptr: np.ndarray
    merge_parts: np.ndarray
    num_parts: int
    has_causal: bool
    small_m: int
    big_m: int
    split_len: int
    num_big: int = 0  # tiles with the BIG flag; they come first

    @property
    def num_tiles(self) -> int:
        return len(self.tiles)

    @property
    def num_merge_rows(self) -> int:
        return len(self.merge_rows)

    @property
    def variant(self) -> tuple[int, int, bool]:
        """What the kernel is compiled for (small_m, big_m, has_causal): a captured launch serves one."""
        return self.small_m, self.big_m, self.has_causal


def _cdiv(a, b):
    return -(-a // b)


def tile_sizes(group: int, max_q_len: int, big_m_max: int = BIG_M_MAX) -> tuple[int, int]:
    """(small_m, big_m): packed rows of the two tile classes; each holds whole query rows.

    big_m_max SPLIT_BIG_M: 128-row big tiles where an item has that many packed rows (eager plans)."""
    small_m = max(16, 1 << (group - 1).bit_length())
    big_m = big_m_max if max_q_len * group >= big_m_max else 64
    return small_m, max(small_m, big_m)


def _query_blocks(q_len, kv_len, causal, rows_small, rows_big):
    """Split every item's rows into blocks: (item, q_off, n_rows, kv_end, big) per block."""
    big = q_len > rows_small
    rows_per_block = np.where(big, rows_big, rows_small)
    n_blocks = np.where((q_len > 0) & (kv_len > 0), _cdiv(q_len, rows_per_block), 0)
    item = np.repeat(np.arange(len(q_len)), n_blocks)
    first = np.repeat(np.cumsum(n_blocks) - n_blocks, n_blocks)
    q_off = (np.arange(len(item)) - first) * rows_per_block[item]
    n_rows = np.minimum(rows_per_block[item], q_len[item] - q_off)
    # A causal block's last row sees keys up to kv_len - q_len + q_off + n_rows - 1.
    causal_end = kv_len[item] - q_len[item] + q_off + n_rows
    kv_end = np.where(causal[item] != 0, np.clip(causal_end, 0, kv_len[item]), kv_len[item])
    return item, q_off, n_rows, kv_end, big[item]


def choose_split_len(kv_end: np.ndarray, big: np.ndarray, num_kv_heads: int, num_sms: int,
                     block_n: int) -> int:
    """Keys per split: the power of two (>= 4 blocks) giving about PROGRAMS_PER_SM programs of work per SM."""
    cost = kv_end * np.where(big, 2, 1)  # a big tile does more arithmetic per key
    target_programs = PROGRAMS_PER_SM * num_sms
    split = max(int(kv_end.max(initial=1)), 1)
    per_program = int(cost.sum()) * num_kv_heads // target_programs
    split = min(split, max(per_program, 1))
    return max(1 << (split - 1).bit_length(), 4 * block_n)


def plan_on_host(work: AttentionWork, num_rows: int, group: int, num_kv_heads: int, num_sms: int,
                 block_n: int, big_m_max: int = BIG_M_MAX) -> HostPlan:
    """Tile the work list on the host (see the module docstring); rows >= the items' rows are uncovered."""
    src = getattr(work, "host", None) or work  # the engine's host copy: no device round trip
    host = [_host_int64(t) for t in (src.q_start, src.q_len, src.kv_len, src.causal, src.page_start)]
    q_start, q_len, kv_len, causal, page_start = (a[:work.num_items] for a in host)
    small_m, big_m = tile_sizes(group, int(q_len.max(initial=0)), big_m_max)
    item, q_off, n_rows, kv_end, big = _query_blocks(q_len, kv_len, causal, small_m // group, big_m // group)
    split_len = choose_split_len(kv_end, big, num_kv_heads, num_sms, block_n)

    n_split = _cdiv(kv_end, split_len)
    blk = np.repeat(np.arange(len(item)), n_split)
    split_idx = np.arange(len(blk)) - np.repeat(np.cumsum(n_split) - n_split, n_split)
    it = item[blk]
    tiles = np.zeros((len(blk), TILE_FIELDS), dtype=np.int64)
    tiles[:, ROW0] = q_start[it] + q_off[blk]
    tiles[:, N_ROWS] = n_rows[blk]
    tiles[:, KV_START] = split_idx * split_len
    tiles[:, KV_END] = np.minimum(kv_end[blk], tiles[:, KV_START] + split_len)
    tiles[:, CAUSAL_SHIFT] = np.where(causal[it] != 0, kv_len[it] - q_len[it] + q_off[blk], NO_CAUSAL)
    tiles[:, PAGE_START] = page_start[it]
    tiles[:, BIG] = big[blk]
    work_per_tile = (tiles[:, KV_END] - tiles[:, KV_START]) * (1 + tiles[:, BIG])
    # big tiles first (their own launch), each class longest first (a greedy LPT order for the hardware scheduler):
    # one stable sort on a key of both, the order of a lexsort by (-BIG, -work)
    key = work_per_tile + tiles[:, BIG] * (int(work_per_tile.max(initial=0)) + 1)
    tiles = tiles[np.argsort(-key, kind="stable")]

    merge_rows, merge_ptr, merge_parts, num_parts = _merge_lists(tiles, num_rows)
    return HostPlan(tiles, merge_rows, merge_ptr, merge_parts, num_parts,
                    bool(((causal != 0) & (q_len > 1)).any()), small_m, big_m, split_len, int(tiles[:, BIG].sum()))


def _host_int64(values) -> np.ndarray:
    """A work-list column (numpy array, or a tensor anywhere) as an int64 numpy array on the host."""
    if isinstance(values, np.ndarray):
        return values.astype(np.int64)
    return values.cpu().numpy().astype(np.int64)


def host_plan_arrays(plan: HostPlan) -> dict[str, np.ndarray]:
    """The plan's tables as int32 arrays, named for `device_plan_from_arrays` (to be sent in one copy)."""
    as32 = lambda a: np.ascontiguousarray(a, dtype=np.int32).reshape(-1)  # noqa: E731
    return {"plan_tiles": as32(plan.tiles), "plan_merge_rows": as32(plan.merge_rows),
            "plan_merge_ptr": as32(plan.merge_ptr), "plan_merge_parts": as32(plan.merge_parts)}


def device_plan_from_arrays(plan: HostPlan, views: dict) -> AttentionPlan:
    """The `AttentionPlan` of `plan` over device tensors that hold `host_plan_arrays(plan)` (same names)."""
    return AttentionPlan(views["plan_tiles"].view(-1, TILE_FIELDS), views["plan_merge_rows"],
                         views["plan_merge_ptr"], views["plan_merge_parts"], plan.num_tiles, plan.num_parts,
                         plan.num_merge_rows, plan.has_causal, plan.small_m, plan.big_m, plan.split_len,
                         num_big=plan.num_big)


def build_plan(work: AttentionWork, num_rows: int, group: int, num_kv_heads: int, num_sms: int, block_n: int,
               device: torch.device, big_m_max: int = BIG_M_MAX) -> AttentionPlan:
    """Tile the work list and move the plan to `device` (one host-to-device copy per array)."""
    host = plan_on_host(work, num_rows, group, num_kv_heads, num_sms, block_n, big_m_max)
    to_dev = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(device, non_blocking=True)  # noqa: E731
    return AttentionPlan(to_dev(host.tiles), to_dev(host.merge_rows), to_dev(host.merge_ptr),
                         to_dev(host.merge_parts), host.num_tiles, host.num_parts, host.num_merge_rows,
                         host.has_causal, host.small_m, host.big_m, host.split_len, num_big=host.num_big)


def _merge_lists(tiles: np.ndarray, num_rows: int):
    """Give non-direct tiles scratch rows (PART_BASE, in place) and list each merge row's partials.

    A tile is direct (PART_BASE = -1) when each of its rows is covered by it alone.  The
    merge rows are the rows of non-direct tiles, and the rows covered by no tile (with
    no partials: the merge writes zeros there, as the reference does).
    """
    n_rows = tiles[:, N_ROWS]
    offsets = _ranges(n_rows)  # each tile row's index inside its tile
    row_of = np.repeat(tiles[:, ROW0], n_rows) + offsets
    cover = np.bincount(row_of, minlength=num_rows)
    tile_of = np.repeat(np.arange(len(tiles)), n_rows)
    shared = cover[row_of] > 1
    tile_shared = np.bincount(tile_of, weights=shared, minlength=len(tiles)) > 0
    part_rows = np.where(tile_shared, n_rows, 0)
    tiles[:, PART_BASE] = np.where(tile_shared, np.cumsum(part_rows) - part_rows, -1)

    keep = tile_shared[tile_of]
    rows, parts = row_of[keep], (np.repeat(tiles[:, PART_BASE], n_rows) + offsets)[keep]
    # a stable sort by row: rows of up to 65536 as uint16, which numpy sorts by radix
    order = np.argsort(rows.astype(np.uint16) if num_rows <= 1 << 16 else rows, kind="stable")
    rows, parts = rows[order], parts[order]
    counts = np.bincount(rows, minlength=num_rows)
    merge_rows = np.flatnonzero((counts > 0) | (cover == 0))
    merge_ptr = np.zeros(len(merge_rows) + 1, dtype=np.int64)
    np.cumsum(counts[merge_rows], out=merge_ptr[1:])
    return merge_rows, merge_ptr, parts, int(part_rows.sum())


def _ranges(lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges: [0..l0), [0..l1), ..."""
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


@dataclass(frozen=True)
class FixedPlanLayout:
    """Where the plans of a CUDA graph's steps live in one flat int32 buffer.

        [counts (3) | tiles (max_tiles x TILE_FIELDS) | merge_rows (max_rows) | merge_ptr (max_rows + 1)
         | merge_parts (max_parts)]

    A graph captures launches over views of the device buffer; each step writes its
    plan into a host buffer of the same layout (`write`) and one copy moves it, so no
    pointer changes between capture and replay.  Entries past a step's counts are
    stale and never read: the fixed-grid kernels skip programs past the counts.
    """

    max_tiles: int
    max_rows: int
    max_parts: int

    @property
    def size(self) -> int:
        return 3 + self.max_tiles * TILE_FIELDS + 2 * self.max_rows + 1 + self.max_parts

    def views(self, flat):
        """(counts, tiles, merge_rows, merge_ptr, merge_parts) of `flat` (numpy or torch, >= size long)."""
        ends = np.cumsum([3, self.max_tiles * TILE_FIELDS, self.max_rows, self.max_rows + 1, self.max_parts])
        counts, tiles, rows, ptr, parts = (flat[a:b] for a, b in zip([0, *ends[:-1]], ends))
        return counts, tiles.reshape(self.max_tiles, TILE_FIELDS), rows, ptr, parts

    def fits(self, plan: HostPlan) -> bool:
        return (plan.num_tiles <= self.max_tiles and plan.num_merge_rows <= self.max_rows
                and plan.num_parts <= self.max_parts)

    def write(self, flat: np.ndarray, plan: HostPlan) -> None:
        """Lay `plan` out in the host buffer `flat` (int32); it must fit."""
        counts, tiles, rows, ptr, parts = self.views(flat)
        counts[:] = (plan.num_tiles, plan.num_merge_rows, plan.num_big)
        tiles[:plan.num_tiles] = plan.tiles
        rows[:plan.num_merge_rows] = plan.merge_rows
        ptr[:plan.num_merge_rows + 1] = plan.merge_ptr
        parts[:plan.num_parts] = plan.merge_parts

    def device_plan(self, flat: torch.Tensor, variant: tuple[int, int, bool], grid_tiles: int, grid_rows: int,
                    scratch_parts: int, grid_big: int | None = None) -> AttentionPlan:
        """A fixed-grid plan over the device buffer: grids of grid_big big-tile programs (default grid_tiles),
        grid_tiles small-tile ones and grid_rows merge ones, scratch for scratch_parts partials; `variant`
        (HostPlan.variant) fixes the kernel's tile classes."""
        grid_big = grid_tiles if grid_big is None else grid_big
        assert max(grid_tiles, grid_big) <= self.max_tiles and grid_rows <= self.max_rows
        assert scratch_parts <= self.max_parts
        counts, tiles, rows, ptr, parts = self.views(flat)
        small_m, big_m, has_causal = variant
        return AttentionPlan(tiles, rows, ptr, parts, grid_tiles, scratch_parts, grid_rows, has_causal, small_m,
                             big_m, 0, counts, num_big=grid_big)
