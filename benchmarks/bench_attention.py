"""Microbenchmark of the fused prefix-shared decode attention (issue 4), for one GPU.

One decode step of llama-8b attention (32 query heads, 8 KV heads, head_dim 128,
bf16, pages of 16): 256 requests in prefix groups of 1, 8, 32 or 128 over a
shared prefix of 512, 2048 or 8192 tokens, each with its own suffix of 128 or
512 tokens.  For each batch, the median time (triton.testing.do_bench) of

* fused:       our kernel over the work list with sharing (one prefix item per group),
* no-share:    our kernel over the same pages with sharing off (one item per request
               over its whole context: what a prefix-unaware paged kernel reads),
* sdpa:        torch scaled_dot_product_attention per request, each over its KV
               gathered from the pages (gather included: the naive path),
* floor:       the unique KV bytes read once (prefixes once, suffixes once) over the
               device-to-device copy bandwidth measured in the same run.

Prints a markdown table and writes bench_attention.json under --out (default $OUT).
Usage: python benchmarks/bench_attention.py [--out DIR] [--quick | --tune | --prefill]

--prefill: mixed steps with prefill chunks (the 128-row big-tile configs, the decode plans' 64-row
plan, and FlashAttention through torch SDPA on the same prefill work).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from batchllm_dask.kernels import attention_plan, prefix_attention
from batchllm_dask.kernels.prefix_attention import _plan_for, fused_paged_attention
from batchllm_dask.kernels.reference import AttentionWork, paged_attention_reference

HQ, HKV, D, PAGE, REQUESTS = 32, 8, 128, 16, 256
DTYPE = torch.bfloat16


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second (1 GiB buffers)."""
    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def make_batch(group: int, prefix: int, suffix: int):
    """Pool, queries, and the work lists with sharing on and off (prefix pages shared physically)."""
    groups = REQUESTS // group
    pp, sp = prefix // PAGE, -(-suffix // PAGE)
    num_pages = groups * pp + REQUESTS * sp
    perm = torch.randperm(num_pages, device="cuda").int()  # scattered pages, as in a used pool
    prefix_pages = perm[:groups * pp].view(groups, pp)
    suffix_pages = perm[groups * pp:].view(REQUESTS, sp)
    k = torch.randn(num_pages, PAGE, HKV, D, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    q = torch.randn(REQUESTS, HQ, D, device="cuda", dtype=DTYPE)
    pre, suf = prefix_pages.tolist(), suffix_pages.tolist()
    shared = AttentionWork.from_lists(
        [g * group for g in range(groups)] + list(range(REQUESTS)), [group] * groups + [1] * REQUESTS,
        [prefix] * groups + [suffix] * REQUESTS, [0] * groups + [1] * REQUESTS, pre + suf, device="cuda")
    unshared = AttentionWork.from_lists(
        list(range(REQUESTS)), [1] * REQUESTS, [prefix + suffix] * REQUESTS, [1] * REQUESTS,
        [pre[r // group] + suf[r] for r in range(REQUESTS)], device="cuda")
    unique_bytes = (groups * prefix + REQUESTS * suffix) * HKV * D * 2 * k.element_size() + 2 * q.nbytes
    return q, k, v, shared, unshared, unique_bytes


def sdpa_per_request(q, k, v, unshared: AttentionWork, sm_scale: float):
    """The naive path: gather each request's KV from its pages, then SDPA (GQA) per request."""
    ctx = int(unshared.kv_len[0])
    pages = unshared.page_ids.view(REQUESTS, -1).long()

    def run():
        for r in range(REQUESTS):
            kr = k[pages[r]].flatten(0, 1)[:ctx].transpose(0, 1)[None]  # [1, Hkv, L, D]
            vr = v[pages[r]].flatten(0, 1)[:ctx].transpose(0, 1)[None]
            F.scaled_dot_product_attention(q[r, :, None][None], kr, vr, scale=sm_scale, enable_gqa=True)
    return run


def bench_one(group: int, prefix: int, suffix: int, bandwidth: float, check: bool) -> dict:
    q, k, v, shared, unshared, unique_bytes = make_batch(group, prefix, suffix)
    sm_scale = D ** -0.5
    out = torch.empty_like(q)
    t0 = time.perf_counter()
    plan = _plan_for(shared, q, HKV)
    plan_ms = (time.perf_counter() - t0) * 1e3
    if check:
        ref = paged_attention_reference(q.float(), k.float(), v.float(), shared, sm_scale)
        got = fused_paged_attention(q, k, v, shared, sm_scale, out=out).float()
        err = ((got - ref).norm() / ref.norm()).item()
    else:
        err = float("nan")
    fused = do_bench(lambda: fused_paged_attention(q, k, v, shared, sm_scale, out=out), return_mode="median")
    off = do_bench(lambda: fused_paged_attention(q, k, v, unshared, sm_scale, out=out), return_mode="median")
    sdpa = do_bench(sdpa_per_request(q, k, v, unshared, sm_scale), warmup=5, rep=50, return_mode="median")
    floor = unique_bytes / bandwidth * 1e3
    return dict(group=group, prefix=prefix, suffix=suffix, fused_ms=fused, no_share_ms=off, sdpa_ms=sdpa,
                floor_ms=floor, unique_mb=unique_bytes / 1e6, bw_frac=floor / fused, speedup_vs_no_share=off / fused,
                tiles=plan.num_tiles, split_len=plan.split_len, merge_rows=plan.num_merge_rows,
                plan_host_ms=plan_ms, rel_err=err)


# Tuning variants: (programs per SM for split-K, largest big tile, pipeline stages, keys per step of a
# small tile, of a big tile).  Run 2 (H100, 2026-11-22) chose split16 over 4 programs per SM (-10 to -25%);
# big tiles of 128 rows with 8 warps were slower everywhere; 3 stages within noise.  Run 3: 128 keys per
# step in big tiles slowed every batch, even those without big tiles (the kernel's registers are the max of
# both tile classes: lower occupancy for the small ones); 8 or 32 programs per SM no better than 16.
# Run 4 (H200, 2026-12-02, engine-like decode steps, benchmarks/decode_attention_sweep.py, BENCHMARKS.md): 2 warps per
# small tile beat 4 (no-sharing decodes 70% -> 87% of the copy bandwidth); each class now has its own launch.
# name: (programs per SM for split-K, big tile rows of decode plans, small-tile config, 64-row big-tile config)
T = prefix_attention.TileConfig
VARIANTS = {"base": (16, 64, T(64, 2, 2), T(64, 4, 2)), "small_w4": (16, 64, T(64, 4, 2), T(64, 4, 2)),
            "small_n128": (16, 64, T(128, 2, 2), T(64, 4, 2)), "small_st3": (16, 64, T(64, 2, 3), T(64, 4, 2)),
            "big128": (16, 128, T(64, 2, 2), T(64, 4, 2)), "split8": (8, 64, T(64, 2, 2), T(64, 4, 2))}
TUNE_SHAPES = [(1, 2048, 512), (8, 8192, 128), (32, 2048, 128), (32, 2048, 512), (32, 8192, 128),
               (128, 2048, 128), (128, 8192, 128)]


def set_variant(name: str) -> None:
    attention_plan.PROGRAMS_PER_SM, attention_plan.BIG_M_MAX, small, big64 = VARIANTS[name]
    prefix_attention.SMALL_TILE, prefix_attention.BIG_TILES[64] = small, big64
    prefix_attention.SMALL_TILE_CONFIGS = {}  # the variant's small tile for every head_dim


def tune(bandwidth: float, out_dir: str) -> None:
    """Fused time of each variant on a few batches (a table of ms), checked against the reference once."""
    table = {}
    for shape in TUNE_SHAPES:
        q, k, v, shared, _, unique_bytes = make_batch(*shape)
        ref = paged_attention_reference(q.float(), k.float(), v.float(), shared, D ** -0.5) if shape[1] <= 2048 else None
        out = torch.empty_like(q)
        for name in VARIANTS:
            set_variant(name)
            fused_paged_attention(q, k, v, shared, D ** -0.5, out=out)
            if ref is not None:
                assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2, name
            table[(shape, name)] = do_bench(lambda q=q, k=k, v=v, shared=shared: fused_paged_attention(q, k, v, shared, D ** -0.5, out=out),
                                            return_mode="median")
        floor = unique_bytes / bandwidth * 1e3
        print(f"{shape}: floor {floor:.3f} ms; " + ", ".join(f"{n} {table[(shape, n)]:.3f}" for n in VARIANTS),
              flush=True)
        del q, k, v, shared
        torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "tune_attention.json"), "w") as f:
        json.dump({f"{s}|{n}": t for (s, n), t in table.items()}, f, indent=1)
    set_variant("base")


# ---------------------------------------------------------------------------------------------- prefill

PREFILL_SHAPES = {  # name: (prefill chunks, chunk tokens, shared prefix tokens, decode rows)
    "instructions": (16, 160, 2048, 256),  # shared-instructions: questions over one 2048-token prefix
    "document": (2, 2048, 512, 64),        # doc-qa: documents prefilled after a 512-token system prompt
    "unshared": (8, 512, 0, 128),          # no-sharing: causal self-attention only
}
PREFILL_CONFIGS = [(64, 8, 3), (64, 8, 2), (64, 4, 3), (128, 8, 3), (128, 8, 2), (32, 4, 3)]


def make_mixed_step(chunks: int, chunk: int, prefix: int, decodes: int, hq: int, hkv: int, d: int):
    """A mixed step as the engine builds it: prefill chunks (each causal over its own pages) below one shared
    prefix (one item for all of their rows and the decode rows), and decode rows with their own suffixes."""
    rows = decodes + chunks * chunk
    pp, cp, sp = -(-prefix // PAGE), -(-chunk // PAGE), 8  # decode suffixes of 128 tokens
    num_pages = pp + chunks * cp + decodes * sp + 1
    perm = torch.randperm(num_pages, device="cuda").int().tolist()
    prefix_pages, rest = perm[:pp], perm[pp:]
    chunk_pages = [rest[i * cp:(i + 1) * cp] for i in range(chunks)]
    dec_pages = [rest[chunks * cp + i * sp: chunks * cp + (i + 1) * sp] for i in range(decodes)]
    q_start, q_len, kv_len, causal, pages = [], [], [], [], []
    for i in range(decodes):
        q_start.append(i), q_len.append(1), kv_len.append(8 * PAGE), causal.append(1), pages.append(dec_pages[i])
    for c in range(chunks):
        q_start.append(decodes + c * chunk), q_len.append(chunk), kv_len.append(chunk), causal.append(1)
        pages.append(chunk_pages[c])
    if prefix:
        q_start.append(0), q_len.append(rows), kv_len.append(prefix), causal.append(0), pages.append(prefix_pages)
    work = AttentionWork.from_lists(q_start, q_len, kv_len, causal, pages, device="cuda")
    k = torch.randn(num_pages, PAGE, hkv, d, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    q = torch.randn(rows, hq, d, device="cuda", dtype=DTYPE)
    flops = 4 * hq * d * (rows * prefix + chunks * chunk * (chunk + 1) / 2 + decodes * 8 * PAGE)
    return q, k, v, work, flops


def sdpa_same_shapes(chunks: int, chunk: int, prefix: int, decodes: int, hq: int, hkv: int, d: int):
    """FlashAttention (torch SDPA) on the same prefill work, contiguous: the chunks' rows against the prefix
    (full), and each chunk causally against itself.  Decodes are left out (they are not prefill)."""
    qp = torch.randn(1, hq, chunks * chunk, d, device="cuda", dtype=DTYPE)
    kp = torch.randn(1, hkv, max(prefix, 1), d, device="cuda", dtype=DTYPE)
    qc = torch.randn(chunks, hq, chunk, d, device="cuda", dtype=DTYPE)
    kc = torch.randn(chunks, hkv, chunk, d, device="cuda", dtype=DTYPE)

    def run():
        if prefix:
            F.scaled_dot_product_attention(qp, kp, kp, enable_gqa=True)
        F.scaled_dot_product_attention(qc, kc, kc, is_causal=True, enable_gqa=True)
    return run, 4 * hq * d * (chunks * chunk * prefix + chunks * chunk * (chunk + 1) / 2)


def bench_prefill(out_dir: str) -> None:
    """Each 128-row big-tile config, and the 64-row big tiles of decode plans, on mixed steps at llama-8b
    (head_dim 128) and llama-1b (64) head shapes, against FlashAttention (SDPA) on the same prefill work."""
    results, engine_configs = [], dict(prefix_attention.BIG_TILE_CONFIGS)
    for hq, hkv, d in ((32, 8, 128), (32, 8, 64)):
        for name, shape in PREFILL_SHAPES.items():
            q, k, v, work, flops = make_mixed_step(*shape, hq, hkv, d)
            ref = paged_attention_reference(q.float(), k.float(), v.float(), work, d ** -0.5) \
                if shape[0] * shape[1] <= 2600 else None
            out = torch.empty_like(q)
            row = {"head_dim": d, "shape": name, "gflop": flops / 1e9}
            for (bn, warps, stages), split_masked in itertools.product(PREFILL_CONFIGS, (True, False)):
                prefix_attention.BIG_TILE_CONFIGS[d] = prefix_attention.TileConfig(bn, warps, stages)
                prefix_attention.SPLIT_MASKED = split_masked
                _plan_for.__globals__["_plan_cache"].clear()
                fused_paged_attention(q, k, v, work, d ** -0.5, out=out)
                if ref is not None:
                    err = ((out.float() - ref).norm() / ref.norm()).item()
                    assert err < 2e-2, (name, bn, warps, stages, split_masked, err)
                ms = do_bench(lambda q=q, k=k, v=v, w=work: fused_paged_attention(q, k, v, w, d ** -0.5, out=out),
                              return_mode="median")
                row[f"{'split' if split_masked else 'masked'}_n{bn}_w{warps}_s{stages}"] = ms
            prefix_attention.SPLIT_MASKED = True
            prefix_attention.BIG_TILE_CONFIGS.clear()
            prefix_attention.BIG_TILE_CONFIGS.update(engine_configs)
            # the decode plans' 64-row big tiles (as a CUDA graph runs them), attached to a copy of the work
            mixed = dataclasses.replace(work)
            host = prefix_attention.host_plan(work, q.shape[0], hq, hkv, q.device, split=False)
            to_dev = {n: torch.from_numpy(a).cuda() for n, a in attention_plan.host_plan_arrays(host).items()}
            prefix_attention.attach_plan(mixed, attention_plan.device_plan_from_arrays(host, to_dev))
            row["mixed_64"] = do_bench(lambda q=q, k=k, v=v, w=mixed: fused_paged_attention(q, k, v, w, d ** -0.5,
                                                                                              out=out),
                                       return_mode="median")
            run, sdpa_flops = sdpa_same_shapes(*shape, hq, hkv, d)
            row["sdpa_prefill_ms"] = do_bench(run, return_mode="median")
            row["sdpa_tflops"] = sdpa_flops / row["sdpa_prefill_ms"] / 1e9
            best = min((k2 for k2 in row if k2.startswith("split")), key=lambda k2: row[k2])
            row["best"], row["best_tflops"] = best, flops / row[best] / 1e9
            best_masked = min((k2 for k2 in row if k2.startswith("masked")), key=lambda k2: row[k2])
            row["best_all_masked"], row["best_all_masked_tflops"] = best_masked, flops / row[best_masked] / 1e9
            results.append(row)
            print(f"d{d} {name}: " + ", ".join(f"{k2} {row[k2]:.3f}" for k2 in row if k2.endswith(("_s2", "_s3", "64"))
                                              or k2 == "sdpa_prefill_ms") +
                  f"; best {best} {row['best_tflops']:.0f} TFLOP/s (every block masked: {best_masked} "
                  f"{row['best_all_masked_tflops']:.0f}), SDPA {row['sdpa_tflops']:.0f} TFLOP/s", flush=True)
            del q, k, v, work
            torch.cuda.empty_cache()
    with open(os.path.join(out_dir, "bench_prefill_attention.json"), "w") as f:
        json.dump(results, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--quick", action="store_true", help="a few batches only")
    parser.add_argument("--tune", action="store_true", help="compare the tuning variants, then stop")
    parser.add_argument("--variant", default="base", choices=sorted(VARIANTS))
    parser.add_argument("--prefill", action="store_true", help="mixed prefill steps: big-tile configs vs SDPA")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    print(f"device {props.name}, {props.multi_processor_count} SMs; copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    if args.tune:
        return tune(bandwidth, args.out)
    if args.prefill:
        return bench_prefill(args.out)
    set_variant(args.variant)
    shapes = [(g, p, s) for g in (1, 8, 32, 128) for p in (512, 2048, 8192) for s in (128, 512)]
    if args.quick:
        shapes = [(1, 2048, 512), (32, 2048, 128), (128, 8192, 512)]
    rows = []
    for i, (g, p, s) in enumerate(shapes):
        rows.append(bench_one(g, p, s, bandwidth, check=i % 6 == 0))
        torch.cuda.empty_cache()
        r = rows[-1]
        print(f"group {g:4d} prefix {p:5d} suffix {s:4d}: fused {r['fused_ms']:.3f} ms, no-share "
              f"{r['no_share_ms']:.3f}, sdpa {r['sdpa_ms']:.2f}, floor {r['floor_ms']:.3f} "
              f"({100 * r['bw_frac']:.0f}% of copy bw), err {r['rel_err']:.1e}", flush=True)
    header = ("| group | prefix | suffix | fused ms | no-share ms | sdpa/request ms | floor ms | fused % of floor "
              "| speedup vs no-share |")
    print("\n" + header + "\n" + "|---" * 9 + "|")
    for r in rows:
        print(f"| {r['group']} | {r['prefix']} | {r['suffix']} | {r['fused_ms']:.3f} | {r['no_share_ms']:.3f} | "
              f"{r['sdpa_ms']:.2f} | {r['floor_ms']:.3f} | {100 * r['bw_frac']:.0f}% | "
              f"{r['speedup_vs_no_share']:.1f}x |")
    meta = dict(device=props.name, sms=props.multi_processor_count, copy_bw=bandwidth, torch=torch.__version__,
                date=time.strftime("%Y-%m-%d"))
    with open(os.path.join(args.out, "bench_attention.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
