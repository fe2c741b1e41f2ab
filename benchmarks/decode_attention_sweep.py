"""Decode attention on engine-like steps, tile configs swept (eager and fixed-grid), and a GEMM efficiency table.

Run on a GPU: python benchmarks/decode_attention_sweep.py  (writes attn_sweep.json under $OUT).
"""
import json, os, time
import numpy as np
import torch
from triton.testing import do_bench
from batchllm_dask.kernels import attention_plan as ap, prefix_attention as pa
from batchllm_dask.kernels.reference import AttentionWork, paged_attention_reference

OUT = os.environ.get("OUT", ".")
HQ, HKV, D, PAGE = 32, 8, 128, 16
DT = torch.bfloat16
rng = np.random.default_rng(0)

def bw():
    src = torch.randn(1 << 28, device="cuda"); dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)

def build(levels, suffixes):
    """levels: list of lists of (first_row, n_rows, kv_len) shared items; suffixes: per-row kv lens."""
    items = []  # (q_start, q_len, kv_len, causal, pages)
    npages = 0
    for lvl in levels:
        for (r0, n, kv) in lvl:
            p = -(-kv // PAGE); items.append([r0, n, kv, 0, p]); npages += p
    for r, kv in enumerate(suffixes):
        p = -(-kv // PAGE); items.append([r, 1, kv, 1, p]); npages += p
    perm = torch.randperm(npages + 8, device="cuda").int()
    pages, off = [], 0
    for it in items:
        pages.append(perm[off:off + it[4]].tolist()); off += it[4]
    k = torch.randn(npages + 8, PAGE, HKV, D, device="cuda", dtype=DT); v = torch.randn_like(k)
    rows = len(suffixes)
    q = torch.randn(rows, HQ, D, device="cuda", dtype=DT)
    work = AttentionWork.from_lists([i[0] for i in items], [i[1] for i in items], [i[2] for i in items],
                                    [i[3] for i in items], pages, device="cuda")
    unique = sum(i[2] for i in items) * HKV * D * 2 * 2 + 2 * q.nbytes
    return q, k, v, work, unique

def step(name):
    if name == "long-output":  # 8 groups x 16, prefix 1024, suffix 128..640
        suf = rng.integers(128, 641, 128).tolist()
        return [[(g * 16, 16, 1024) for g in range(8)]], suf
    if name == "shared-instr":  # 16 groups x 32, prefix 2048, suffix 64..320
        suf = rng.integers(64, 321, 512).tolist()
        return [[(g * 32, 32, 2048) for g in range(16)]], suf
    if name == "doc-qa":  # one 512 system over 256 rows, 64 docs 1024..2048 x 4 rows, suffix 32..192
        docs = rng.integers(1024, 2049, 64).tolist()
        return [[(0, 256, 512)], [(d * 4, 4, docs[d]) for d in range(64)]], rng.integers(32, 193, 256).tolist()
    if name == "no-sharing":  # 256 requests, own 256..1152
        return [], rng.integers(256, 1153, 256).tolist()
    if name == "no-sharing-64":
        return [], rng.integers(256, 1153, 64).tolist()
    raise KeyError(name)

VARIANTS = {  # name: (small block_n, big block_n, num_warps, num_stages, programs per SM)
    "base": (64, 64, 4, 2, 16), "st3": (64, 64, 4, 3, 16), "st4": (64, 64, 4, 4, 16),
    "sn32": (32, 64, 4, 2, 16), "sn128": (128, 64, 4, 2, 16), "sn128w8": (128, 64, 8, 2, 16),
    "w2": (64, 64, 2, 2, 16), "w8": (64, 64, 8, 2, 16), "pps8": (64, 64, 4, 2, 8), "pps32": (64, 64, 4, 2, 32),
    "pps4": (64, 64, 4, 2, 4), "sn32st4": (32, 64, 4, 4, 16), "sn128st3": (128, 64, 4, 3, 16),
}

def set_variant(v):
    sn, bn, w, st, pps = v
    pa._BLOCK_N, pa._BIG_BLOCK_N, pa._NUM_STAGES, ap.PROGRAMS_PER_SM = sn, bn, st, pps
    pa._tile_launch.__defaults__ = (bn, w, st)

def fixed(work, q):
    """Bind a fixed-grid plan as a CUDA graph's launch would see it (capacities as capture_all gives)."""
    rows = q.shape[0]
    layout = pa.fixed_plan_layout(max(rows, 512), HKV, q.device)
    plan = pa.host_plan(work, rows, HQ, HKV, q.device)
    flat = np.zeros(layout.size, np.int32); layout.write(flat, plan)
    dev = torch.from_numpy(flat).cuda()
    spread = 2 * ap.PROGRAMS_PER_SM * pa._num_sms(q.device) // HKV
    tiles = max(plan.num_tiles, rows + spread); parts = max(plan.num_parts, 2 * (rows + spread))
    tiles = min(tiles, layout.max_tiles); parts = min(parts, layout.max_parts)
    w2 = AttentionWork(work.q_start, work.q_len, work.kv_len, work.causal, work.page_start, work.page_ids,
                       work.num_items, work.max_q_len, work.max_kv_len)
    pa.bind_plan(w2, layout.device_plan(dev, plan.variant, tiles, rows, parts))
    return w2, plan

def sweep(b):
    res = {}
    for name in ["long-output", "shared-instr", "doc-qa", "no-sharing", "no-sharing-64"]:
        levels, suf = step(name)
        q, k, v, work, unique = build(levels, suf)
        floor = unique / b * 1e3
        ref = paged_attention_reference(q.float(), k.float(), v.float(), work, D ** -0.5)
        out = torch.empty_like(q)
        line = {}
        for vn, var in VARIANTS.items():
            set_variant(var); pa._plan_cache.clear()
            try:
                pa.fused_paged_attention(q, k, v, work, D ** -0.5, out=out)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = do_bench(lambda: pa.fused_paged_attention(q, k, v, work, D ** -0.5, out=out), return_mode="median")
                wf, plan = fixed(work, q)
                pa.fused_paged_attention(q, k, v, wf, D ** -0.5, out=out)
                errf = ((out.float() - ref).norm() / ref.norm()).item()
                msf = do_bench(lambda: pa.fused_paged_attention(q, k, v, wf, D ** -0.5, out=out), return_mode="median")
                line[vn] = dict(eager_ms=ms, fixed_ms=msf, err=max(err, errf), tiles=plan.num_tiles,
                                split=plan.split_len, merge_rows=plan.num_merge_rows)
            except Exception as e:
                line[vn] = dict(error=repr(e)[:200])
        set_variant(VARIANTS["base"])
        res[name] = dict(floor_ms=floor, unique_mb=unique / 1e6, rows=len(suf), variants=line)
        print(f"== {name}: rows {len(suf)} floor {floor:.4f} ms ({unique/1e6:.0f} MB)", flush=True)
        for vn, r in line.items():
            if "error" in r:
                print(f"   {vn:10s} ERROR {r['error']}"); continue
            print(f"   {vn:10s} eager {r['eager_ms']:.4f} ({floor/r['eager_ms']:.0%})  fixed {r['fixed_ms']:.4f} "
                  f"({floor/r['fixed_ms']:.0%})  err {r['err']:.1e} tiles {r['tiles']} split {r['split']}", flush=True)
        del q, k, v, work; torch.cuda.empty_cache()
    return res

def gemms():
    shapes = {"8b": [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)],
              "1b": [(2048, 3072), (2048, 2048), (2048, 16384), (8192, 2048)]}
    res = {}
    for model, ws in shapes.items():
        for m in [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]:
            tot_ms, flops, byt = 0.0, 0, 0
            for (kk, n) in ws:
                a = torch.randn(m, kk, device="cuda", dtype=DT); w = torch.randn(n, kk, device="cuda", dtype=DT)
                tot_ms += do_bench(lambda: torch.nn.functional.linear(a, w), return_mode="median")
                flops += 2 * m * kk * n; byt += 2 * (kk * n + m * kk + m * n)
            tf = flops / (tot_ms * 1e-3) / 1e12
            bound = max(flops / 790e12, byt / 4.3e12) * 1e3
            res[f"{model}/{m}"] = dict(ms=tot_ms, tflops=tf, of_bound=bound / tot_ms)
            print(f"gemm {model} M={m:6d}: {tot_ms:.3f} ms/layer  {tf:6.0f} TFLOP/s  {bound/tot_ms:.0%} of roofline", flush=True)
    return res

if __name__ == "__main__":
    t = time.time()
    b = bw(); print(f"copy bandwidth {b/1e12:.2f} TB/s", flush=True)
    out = {"bandwidth": b, "gemm": gemms()}
    out["attention"] = sweep(b)
    json.dump(out, open(os.path.join(OUT, "attn_sweep.json"), "w"), indent=1)
    print(f"done in {time.time()-t:.0f} s")
