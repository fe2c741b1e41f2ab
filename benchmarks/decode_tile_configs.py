"""Device diag: the small- and 64-row big-tile configs on engine-like decode steps, as CUDA graphs run them."""
import os, sys
sys.path.insert(0, os.path.dirname(__file__))
import torch
from decode_attention_sweep import build, step, fixed, bw, D, do_bench
from batchllm_dask.kernels import prefix_attention as pa
from batchllm_dask.kernels.reference import paged_attention_reference
T = pa.TileConfig
VARS = {"new": (T(64, 2, 2), T(64, 4, 2)), "old_w4": (T(64, 4, 2), T(64, 4, 2)), "s_st3": (T(64, 2, 3), T(64, 4, 2)),
        "s_n128": (T(128, 2, 2), T(64, 4, 2)), "s_w1": (T(64, 1, 2), T(64, 4, 2)), "s_n32w1": (T(32, 1, 2), T(64, 4, 2)),
        "b_w2": (T(64, 2, 2), T(64, 2, 2)), "b_w8": (T(64, 2, 2), T(64, 8, 3)), "b_st3": (T(64, 2, 2), T(64, 4, 3))}
b = bw()
for name in ["long-output", "shared-instr", "doc-qa", "no-sharing", "no-sharing-64"]:
    levels, suf = step(name)
    q, k, v, work, unique = build(levels, suf)
    floor = unique / b * 1e3
    ref = paged_attention_reference(q.float(), k.float(), v.float(), work, D ** -0.5)
    out = torch.empty_like(q)
    cells = []
    for vn, (small, big) in VARS.items():
        pa.SMALL_TILE, pa.BIG_TILES[64] = small, big
        pa._plan_cache.clear()
        wf, plan = fixed(work, q)
        pa.fused_paged_attention(q, k, v, wf, D ** -0.5, out=out)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        msf = do_bench(lambda: pa.fused_paged_attention(q, k, v, wf, D ** -0.5, out=out), return_mode="median")
        ms = do_bench(lambda: pa.fused_paged_attention(q, k, v, work, D ** -0.5, out=out), return_mode="median")
        assert err < 1e-2, (name, vn, err)
        cells.append(f"{vn} {floor/msf:.0%}/{floor/ms:.0%}")
    print(f"{name:14s} floor {floor:.4f} ms  fixed/eager share of floor: " + ", ".join(cells), flush=True)
    pa.SMALL_TILE, pa.BIG_TILES[64] = VARS["new"]
