"""Engine throughput on the standard workloads, beside the physical bound and transformers in the same run.

For each workload (workloads.py, token-id requests, greedy, EOS ignored): our
`Engine.generate` over all requests at once, and Hugging Face transformers'
static `generate` (batches of 64, hf_anchor.py) on the same random-weight
checkpoint; the roofline bound (roofline.py) from the ceilings measured here.

On the device:
    PYTHONUNBUFFERED=1 python -m batchllm_dask.bench.engine --scale 0.25 --hf-workloads shared-instructions
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from ..engine import Engine, SamplingParams
from ..roofline import SHAPES, lower_bound
from .checkpoints import save_random_checkpoint
from .hf_anchor import agreement, ceilings, hf_static
from .workloads import make_workload, summary


def _params(reqs) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in reqs]


def run_hf(path: Path, workloads: dict, batch_size: int) -> dict:
    """Seconds and tokens of transformers' static generate per workload (model freed afterwards)."""
    if not workloads:
        return {}
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    results = {}
    for name, reqs in workloads.items():
        warm = [type(r)(r.prompt_token_ids, 4, r.group) for r in reqs[:16]]
        hf_static(model, warm, batch_size)
        secs, tokens = hf_static(model, reqs, batch_size)
        results[name] = {"seconds": secs, "tokens": tokens}
        print(f"transformers static {name}: {secs:.2f}s", flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


def run_ours(engine: Engine, reqs) -> dict:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = engine.generate([r.prompt_token_ids for r in reqs], _params(reqs))
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    short = sum(len(o.token_ids) != r.max_tokens for o, r in zip(outs, reqs))
    s = engine.last_stats
    return {"seconds": secs, "tokens": [o.token_ids for o in outs], "count_mismatches": short,
            "steps": s.steps, "mean_tokens_per_step": s.mean_tokens_per_step,
            "computed_prompt_tokens": s.computed_prompt_tokens, "peak_kv_pages": s.peak_kv_pages,
            "kv_pages": s.kv_pages, "preemptions": s.preemptions, "shared_prefixes": s.shared_prefixes}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--workloads", default="shared-instructions,doc-qa,skewed,long-output,no-sharing")
    ap.add_argument("--hf-workloads", default="shared-instructions", help="comma list ('' for none)")
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--cuda-graphs", choices=("on", "off"), default="on",
                    help="replay CUDA graphs for decode-only steps (the engine's default: on)")
    args = ap.parse_args(argv)
    import transformers
    import triton
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "transformers": transformers.__version__, "triton": triton.__version__, "date": time.strftime("%Y-%m-%d")}
    tflops, bw = ceilings()
    print(f"{env} bf16 matmul {tflops / 1e12:.0f} TFLOP/s, copy {bw / 1e12:.2f} TB/s", flush=True)
    shape = SHAPES[args.model]
    names = [n for n in args.workloads.split(",") if n]
    workloads = {n: make_workload(n, shape.vocab, args.scale) for n in names}
    path = Path(tempfile.mkdtemp()) / args.model
    save_random_checkpoint(path, args.model)
    hf = run_hf(path, {n: workloads[n] for n in args.hf_workloads.split(",") if n}, args.hf_batch_size)
    t = time.perf_counter()
    engine = Engine(path, dtype="bfloat16", device="cuda", cuda_graphs=args.cuda_graphs == "on")
    print(f"engine loaded in {time.perf_counter() - t:.1f}s, {engine.num_kv_pages} KV pages", flush=True)
    first = workloads[names[0]]
    engine.generate([r.prompt_token_ids for r in first[:64]], [SamplingParams(max_tokens=4, temperature=0.0)] * 64)
    rows = []
    for name, reqs in workloads.items():
        ours = run_ours(engine, reqs)
        bound = lower_bound(shape, reqs, tflops, bw)
        row = {"workload": name, **summary(reqs), "bound_seconds": bound["seconds"],
               "ours": {k: v for k, v in ours.items() if k != "tokens"}}
        if name in hf:
            row["transformers_static_seconds"] = hf[name]["seconds"]
            row["agreement_with_transformers"] = agreement(ours["tokens"], hf[name]["tokens"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, f"bench_engine_{args.model}_scale{args.scale:g}.json"), "w") as f:
        json.dump({**env, "tflops": tflops, "bandwidth": bw, "args": vars(args), "rows": rows}, f, indent=1)
    print(f"\n{'workload':20s} {'req':>5s} {'out tok':>8s} {'bound s':>8s} {'ours s':>7s} {'of bound':>8s} "
          f"{'out tok/s':>9s} {'tok/step':>8s} {'HF s':>7s} {'vs HF':>6s}")
    for r in rows:
        o, hf_s = r["ours"], r.get("transformers_static_seconds")
        print(f"{r['workload']:20s} {r['requests']:5d} {r['output_tokens']:8d} {r['bound_seconds']:8.2f} "
              f"{o['seconds']:7.2f} {r['bound_seconds'] / o['seconds']:8.1%} {r['output_tokens'] / o['seconds']:9.0f} "
              f"{o['mean_tokens_per_step']:8.0f} {hf_s if hf_s else float('nan'):7.2f} "
              f"{(hf_s / o['seconds']) if hf_s else float('nan'):6.1f}x")


if __name__ == "__main__":
    main()
