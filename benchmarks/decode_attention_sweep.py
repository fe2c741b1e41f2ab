"""Decode attention on engine-like steps, the fused kernel's launch settings swept, as CUDA graphs run it.

Each step is a decode step of a standard workload (shared prefixes over groups of rows, ragged suffixes), at
the llama-1b (head_dim 64) and llama-8b (head_dim 128) head shapes, 32 query and 8 KV heads, bf16, page 16.
It is planned and launched as a decode graph does (fixed-grid plan, capacities as `capture_all` gives),
captured in a CUDA graph and its replay timed with triton's do_bench; the figure is the step's unique KV bytes over the measured copy bandwidth,
against the time (100% = the copy floor).  Every variant's output is checked against the torch reference.

Also the program order (`tile-major`: one KV head's tiles after another, against the engine's heads side by side)
and the grids (`exact-grid`: the step's own plan captured as it is, against a bucket's capacity grids, whose
programs past the step's tiles exit at once).

Settings swept, one at a time from the engine's (prefix_attention.small_tile_config(head_dim), BIG_TILES[64],
attention_plan.PROGRAMS_PER_SM), then a few combinations (the "small-*" variants set the small tile of both head
dims):

    python benchmarks/decode_attention_sweep.py [--shapes 1b,8b] [--variants base,pps32,...]

Writes decode_attention_sweep.json under $OUT.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
from triton.testing import do_bench

from batchllm_dask.kernels import attention_plan as ap
from batchllm_dask.kernels import prefix_attention as pa
from batchllm_dask.kernels.reference import AttentionWork, paged_attention_reference

OUT = os.environ.get("OUT", ".")
HQ, HKV, PAGE = 32, 8, 16
DT = torch.bfloat16
SHAPES = {"1b": 64, "8b": 128}  # head_dim

BASE = dict(small=pa.SMALL_TILE, big64=pa.BIG_TILES[64], pps=ap.PROGRAMS_PER_SM, adjacent=pa.HEADS_ADJACENT,
            exact=False, split_masked=pa.SPLIT_MASKED)
T = pa.TileConfig
VARIANTS = {
    "base": {},
    "small-st3": dict(small=T(64, 2, 3)), "small-st4": dict(small=T(64, 2, 4)),
    "small-w4": dict(small=T(64, 4, 2)), "small-w1": dict(small=T(64, 1, 2)),
    "small-n32": dict(small=T(32, 2, 2)), "small-n32-st4": dict(small=T(32, 2, 4)),
    "small-n128": dict(small=T(128, 2, 2)), "small-n128-w4": dict(small=T(128, 4, 2)),
    "big-st3": dict(big64=T(64, 4, 3)), "big-w2": dict(big64=T(64, 2, 2)), "big-n128": dict(big64=T(128, 4, 2)),
    "pps4": dict(pps=4), "pps8": dict(pps=8), "pps32": dict(pps=32), "pps64": dict(pps=64),
    "pps32-st3": dict(pps=32, small=T(64, 2, 3)), "pps32-n32": dict(pps=32, small=T(32, 2, 2)),
    # the program order: one head's tiles after another (the order before 2026-12-03) against heads side by side
    "tile-major": dict(adjacent=False),
    # the step's exact grids (an eager plan, captured as it is) instead of a bucket's capacity grids: what the
    # fixed grid's idle programs cost
    "exact-grid": dict(exact=True), "tile-major-exact": dict(adjacent=False, exact=True),
    # every key block masked (the kernel before 2026-12-04) against whole blocks unmasked
    "all-masked": dict(split_masked=False),
}


def copy_bandwidth() -> float:
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def step_items(name: str, rng: np.random.Generator):
    """(shared levels: lists of (first row, rows, kv_len)), per-row suffix kv lens) of a workload's decode step."""
    if name == "long-output":  # 8 groups x 16 rows over 1024, suffixes 128..640
        return [[(g * 16, 16, 1024) for g in range(8)]], rng.integers(128, 641, 128).tolist()
    if name == "shared-instr":  # 16 groups x 32 over 2048, suffixes 64..320
        return [[(g * 32, 32, 2048) for g in range(16)]], rng.integers(64, 321, 512).tolist()
    if name == "doc-qa":  # a 512 system over 256 rows, 64 docs of 1024..2048 x 4 rows, suffixes 32..192
        docs = rng.integers(1024, 2049, 64).tolist()
        return [[(0, 256, 512)], [(d * 4, 4, docs[d]) for d in range(64)]], rng.integers(32, 193, 256).tolist()
    if name == "no-sharing":  # 256 requests of 256..1152
        return [], rng.integers(256, 1153, 256).tolist()
    raise KeyError(name)


def build(name: str, head_dim: int):
    rng = np.random.default_rng(0)
    levels, suffixes = step_items(name, rng)
    items = [(r0, n, kv, 0) for level in levels for (r0, n, kv) in level]
    items += [(r, 1, kv, 1) for r, kv in enumerate(suffixes)]
    counts = [-(-kv // PAGE) for _, _, kv, _ in items]
    perm = torch.randperm(sum(counts) + 8).tolist()
    pages, at = [], 0
    for c in counts:
        pages.append(perm[at:at + c])
        at += c
    k = torch.randn(sum(counts) + 8, PAGE, HKV, head_dim, device="cuda", dtype=DT)
    v = torch.randn_like(k)
    q = torch.randn(len(suffixes), HQ, head_dim, device="cuda", dtype=DT)
    work = AttentionWork.from_lists(*map(list, zip(*items)), pages, device="cuda")
    unique = sum(kv for _, _, kv, _ in items) * HKV * head_dim * 2 * 2 + 2 * q.nbytes
    return q, k, v, work, unique


ENGINE_SMALL = dict(pa.SMALL_TILE_CONFIGS)  # the engine's per-head_dim small tiles (the base variant's)


def set_variant(overrides: dict, head_dim: int) -> None:
    chosen = {**BASE, "small": ENGINE_SMALL.get(head_dim, BASE["small"]), **overrides}
    pa.SMALL_TILE_CONFIGS = {}
    pa.SMALL_TILE = chosen["small"]
    pa.BIG_TILES[64] = chosen["big64"]
    ap.PROGRAMS_PER_SM = chosen["pps"]
    pa.HEADS_ADJACENT = chosen["adjacent"]
    pa.SPLIT_MASKED = chosen["split_masked"]
    return chosen


def graph_like(work: AttentionWork, rows: int, device) -> tuple[AttentionWork, ap.HostPlan]:
    """`work` bound to a fixed-grid plan with the capacities DecodeGraphs.capture_all gives a bucket."""
    layout = pa.fixed_plan_layout(512, HKV, device)
    plan = pa.host_plan(work, rows, HQ, HKV, device)
    flat = np.zeros(layout.size, np.int32)
    layout.write(flat, plan)
    spread = 2 * ap.PROGRAMS_PER_SM * pa._num_sms(device) // HKV
    cap = lambda need, floor, top: min(max(1 << max(need - 1, 0).bit_length(), floor), top)  # noqa: E731
    small = cap(max(plan.num_tiles - plan.num_big, rows + 2 * spread), 64, layout.max_tiles)
    big = cap(max(plan.num_big, spread), 64, layout.max_tiles)
    parts = cap(max(plan.num_parts, 2 * (rows + spread)), 64, layout.max_parts)
    bound = AttentionWork(work.q_start, work.q_len, work.kv_len, work.causal, work.page_start, work.page_ids,
                          work.num_items, work.max_q_len, work.max_kv_len)
    pa.bind_plan(bound, layout.device_plan(torch.from_numpy(flat).cuda(), plan.variant, small, rows, parts, big))
    return bound, plan


def exact_plan(work: AttentionWork, rows: int, device) -> tuple[AttentionWork, ap.HostPlan]:
    """`work` with the step's own plan (grids of exactly its tiles and merge rows), as an eager decode step has."""
    plan = pa.host_plan(work, rows, HQ, HKV, device)
    bound = AttentionWork(work.q_start, work.q_len, work.kv_len, work.causal, work.page_start, work.page_ids,
                          work.num_items, work.max_q_len, work.max_kv_len)
    arrays = {k: torch.from_numpy(v).to(device) for k, v in ap.host_plan_arrays(plan).items()}
    pa.attach_plan(bound, ap.device_plan_from_arrays(plan, arrays))
    return bound, plan


def graph_ms(launch) -> float:
    """Milliseconds of one replay of `launch` captured in a CUDA graph, as the engine's decode steps run it (timed
    eagerly, the three launches' Python and driver time would hide the kernels of a small step)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        launch()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        launch()
    return do_bench(graph.replay, warmup=20, rep=200, return_mode="median")


def sweep(bandwidth: float, shapes: list[str], variants: list[str]) -> dict:
    results = {}
    for shape in shapes:
        head_dim = SHAPES[shape]
        for name in ("long-output", "shared-instr", "doc-qa", "no-sharing"):
            q, k, v, work, unique = build(name, head_dim)
            floor_ms = unique / bandwidth * 1e3
            ref = paged_attention_reference(q.float(), k.float(), v.float(), work, head_dim ** -0.5)
            out = torch.empty_like(q)
            line = {}
            for vn in variants:
                chosen = set_variant(VARIANTS[vn], head_dim)
                pa._plan_cache.clear()
                try:
                    planned = exact_plan if chosen["exact"] else graph_like
                    bound, plan = planned(work, q.shape[0], q.device)
                    pa.fused_paged_attention(q, k, v, bound, head_dim ** -0.5, out=out)
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    ms = graph_ms(lambda: pa.fused_paged_attention(q, k, v, bound, head_dim ** -0.5, out=out))
                    line[vn] = dict(ms=ms, of_floor=floor_ms / ms, err=err, tiles=plan.num_tiles,
                                    big=plan.num_big, split=plan.split_len)
                except Exception as exc:  # a variant that does not compile (shared memory) is reported
                    line[vn] = dict(error=repr(exc)[:160])
            set_variant({}, head_dim)
            key = f"{shape}/{name}"
            results[key] = dict(floor_ms=floor_ms, unique_mb=unique / 1e6, rows=q.shape[0], variants=line)
            print(f"== {key}: {q.shape[0]} rows, floor {floor_ms:.4f} ms ({unique / 1e6:.0f} MB)", flush=True)
            for vn, r in line.items():
                if "error" in r:
                    print(f"   {vn:14s} ERROR {r['error']}", flush=True)
                else:
                    print(f"   {vn:14s} {r['ms']:.4f} ms {r['of_floor']:5.0%} of floor  err {r['err']:.1e}  "
                          f"tiles {r['tiles']} (big {r['big']}) split {r['split']}", flush=True)
            torch.cuda.empty_cache()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1b,8b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    start = time.time()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    results = sweep(bandwidth, args.shapes.split(","), args.variants.split(","))
    out = {"bandwidth": bandwidth, "base": {k: str(v) for k, v in BASE.items()}, "steps": results}
    with open(os.path.join(OUT, "decode_attention_sweep.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"done in {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
