"""vLLM offline as the engine benchmark's peer: the same checkpoint, workloads and scales, in its own process.

    python -m batchllm_dask.bench.vllm_peer --checkpoint /tmp/ck/llama-1b --model llama-1b --scales 0.25 [--kv-gib 2]

vLLM (0.26.0 on the GPU machine; `../shared/bench/vllm/` has how its wheels get there) starts on the
checkpoint that `bench.engine` wrote (prefix caching on, no tokenizer, its defaults otherwise: CUDA
graphs, asynchronous scheduling), warms up on tokens no workload uses, then times `LLM.generate` of each
workload's token-id prompts, greedy with EOS ignored (the tokens our engine generates), from an empty
prefix cache, and checks every output's length.  It writes seconds only; `bench.report` puts them beside
our engine and the bound computed with the ceilings of our run.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from ..roofline import SHAPES
from .workloads import WORKLOADS, make_workload

for _key, _value in {"VLLM_USE_FLASHINFER_SAMPLER": "0", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}.items():
    os.environ.setdefault(_key, _value)  # the GPU machine has no network


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--model", default="llama-1b", choices=sorted(SHAPES), help="its shape (for the vocabulary)")
    ap.add_argument("--scales", default="0.25")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--kv-gib", type=float, default=None, help="a fixed KV pool (kv_cache_memory_bytes)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    import vllm
    from vllm import LLM, SamplingParams

    options = dict(model=args.checkpoint, dtype="bfloat16", enable_prefix_caching=True, skip_tokenizer_init=True,
                   gpu_memory_utilization=0.85, max_model_len=8192, seed=0)
    if args.kv_gib:
        options["kv_cache_memory_bytes"] = int(args.kv_gib * 2**30)
    start = time.perf_counter()
    llm = LLM(**options)
    startup = time.perf_counter() - start
    print(f"vllm {vllm.__version__} up in {startup:.0f} s", flush=True)
    vocab = SHAPES[args.model].vocab

    def run(reqs) -> tuple[float, int]:
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in reqs]
        params = [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
                  for r in reqs]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t
        return seconds, sum(len(o.outputs[0].token_ids) != r.max_tokens for o, r in zip(outs, reqs))

    run(make_workload("no-sharing", vocab, 0.05, seed=7))
    rows = []
    for scale in [float(s) for s in args.scales.split(",")]:
        for name in args.workloads.split(","):
            reqs = make_workload(name, vocab, scale)
            if not llm.reset_prefix_cache():
                raise RuntimeError("vLLM did not reset its prefix cache")
            seconds, wrong = run(reqs)
            rows.append({"workload": name, "scale": scale, "seconds": seconds, "wrong_lengths": wrong,
                         "kv_gib": args.kv_gib})
            print(json.dumps(rows[-1]), flush=True)
    tag = f"vllm_{args.model}" + (f"_kv{args.kv_gib:g}" if args.kv_gib else "")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"{tag}.json").write_text(json.dumps(
        {"vllm": vllm.__version__, "model": args.model, "startup_seconds": startup, "rows": rows}, indent=1))
    return 0 if all(r["wrong_lengths"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
