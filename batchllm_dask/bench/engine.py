"""The engine's speed on the standard workloads: beside the roofline bound, its own ablations and the peers.

For each workload (workloads.py: token-id requests, greedy, EOS ignored) and scale, `Engine.generate` over
every request at once on a random-weight checkpoint of a standard shape, timed after a warm-up:

- seconds, output tokens/s, share of the bound (roofline.py, from ceilings measured in the same run),
  mean tokens per step, host milliseconds per step (loop time not spent waiting on the device);
- GPU busy share: the union of the kernels' intervals (a second run under torch.profiler, CUDA activity
  only) over the timed run's wall time;
- the ablations, each the full engine with one technique taken away: prefix sharing off, decode-first
  ordering off, count-bounded batching (a fixed cap of running requests and no decode reserve: admission by
  count, not by memory), the torch reference attention instead of the Triton kernels (slow: run at its
  own small scale), and steps with prefill chunks run eagerly instead of from CUDA graphs
  (mixed-graphs-off); their greedy tokens are compared with the full engine's;
- Hugging Face transformers' static `generate` on the workloads of --hf-workloads at --hf-scale;
- an extra KV-pool run (--kv-gib: a fixed pool, the memory-pressure case) at --kv-scale.

vLLM runs in its own process on the same checkpoint (bench/vllm_peer.py; `benchmarks/gpu_bench.sh` runs
both and `bench/report.py` joins them into the table and the chart).  Nothing here is a pass/fail test:
it prints figures and writes JSON to --out.

    python -m batchllm_dask.bench.engine --model llama-1b --scales 0.25,1.0 --checkpoint /tmp/ck-llama-1b
    python -m batchllm_dask.bench.engine --tiny            # CPU: the script itself, on the tiny model
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine import Engine, SamplingParams
from ..roofline import SHAPES, ModelShape, lower_bound
from .cuda import free_memory, release_report, synchronize
from .workloads import WORKLOADS, make_workload, summary

ABLATIONS = {  # name -> engine options that take one technique away
    "sharing-off": {"prefix_sharing": False},
    "decode-first-off": {"decode_first": False},
    "count-bounded": {"max_num_seqs": 64, "decode_reserve": 0.0},
    "torch-attention": {"attention_backend": "torch", "cuda_graphs": False},
    "mixed-graphs-off": {"cuda_graph_max_tokens": 0},  # steps with prefill chunks eager (mixed_graphs.py)
}


@dataclass
class Run:
    """One timed `Engine.generate` of one workload, scale and variant."""

    workload: str
    scale: float
    variant: str
    requests: int
    output_tokens: int
    unique_prompt_tokens: int
    seconds: float
    bound_seconds: float
    share_of_bound: float
    output_tokens_per_s: float
    steps: int
    mean_tokens_per_step: float
    host_ms_per_step: float
    wait_share: float  # share of the wall time the host waited on the device
    computed_prompt_tokens: int
    preemptions: int
    recomputed_tokens: int
    kv_pages: int
    complete: bool  # every request generated exactly its max_tokens
    tokens_digest: str
    gpu_busy_share: float | None = None
    agreement_with_full: dict | None = None
    graph_captures: int = 0  # CUDA graphs captured during the timed run (a new shape or a larger plan)


def params_of(reqs) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in reqs]


def time_engine(engine: Engine, reqs, shape: ModelShape, ceilings: tuple[float, float], workload: str,
                scale: float, variant: str) -> tuple[Run, list[list[int]]]:
    synchronize()
    captures = _graph_captures(engine)
    start = time.perf_counter()
    outs = engine.generate([r.prompt_token_ids for r in reqs], params_of(reqs))
    synchronize()
    seconds = time.perf_counter() - start
    tokens = [o.token_ids for o in outs]
    s, info = engine.last_stats, summary(reqs)
    bound = lower_bound(shape, reqs, *ceilings)["seconds"]
    run = Run(workload, scale, variant, len(reqs), info["output_tokens"], info["unique_prompt_tokens"], seconds,
              bound, bound / seconds, info["output_tokens"] / seconds, s.steps, s.mean_tokens_per_step,
              1e3 * s.host_seconds / max(s.steps, 1), s.wait_seconds / s.seconds, s.computed_prompt_tokens,
              s.preemptions, s.recomputed_tokens, s.kv_pages,
              all(len(t) == r.max_tokens for t, r in zip(tokens, reqs)), _digest(tokens))
    run.graph_captures = _graph_captures(engine) - captures
    return run, tokens


def _graph_captures(engine: Engine) -> int:
    return sum(g.captures for g in (engine.runner.graphs, engine.runner.mixed_graphs) if g is not None)


def gpu_busy_seconds(engine: Engine, reqs) -> float:
    """The union of kernel intervals of one more run of `reqs`, under torch.profiler (CUDA activity only)."""
    from torch.profiler import ProfilerActivity, profile

    from .profile import busy_union, kernel_intervals
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.generate([r.prompt_token_ids for r in reqs], params_of(reqs))
        synchronize()
    return busy_union(kernel_intervals(prof)) / 1e6


def _digest(tokens: list[list[int]]) -> str:
    return hashlib.sha1(json.dumps(tokens).encode()).hexdigest()[:12]


def measured_ceilings(tiny: bool) -> tuple[float, float]:
    if tiny:  # the CPU check: nominal H200 ceilings, the bound is only printed
        return 790e12, 4.3e12
    from .hf_anchor import ceilings
    return ceilings()


def warm_up(engine: Engine, vocab: int) -> None:
    """Compile every kernel variant (prefill with shared prefixes, decodes) on tokens no workload uses."""
    for name in ("shared-instructions", "no-sharing"):
        reqs = make_workload(name, vocab, 0.02 if name == "no-sharing" else 0.05, seed=7)
        engine.generate([r.prompt_token_ids for r in reqs], [SamplingParams(max_tokens=8, temperature=0.0,
                                                                            ignore_eos=True)] * len(reqs))


def run_full(engine: Engine, args, shape: ModelShape, ceilings, workloads: list[str]) -> tuple[list[Run], dict]:
    """The full engine on every workload and scale; the tokens of each (workload, scale) for the ablations."""
    runs, tokens = [], {}
    for scale in args.scales:
        for name in workloads:
            reqs = make_workload(name, shape.vocab, scale)
            run, toks = time_engine(engine, reqs, shape, ceilings, name, scale, "full")
            if scale == args.busy_scale and torch.cuda.is_available():
                run.gpu_busy_share = gpu_busy_seconds(engine, reqs) / run.seconds
            tokens[(name, scale)] = toks
            runs.append(run)
            _print(run)
    return runs, tokens


def _ablation_scale(args, name: str) -> float:
    return args.torch_attention_scale if name == "torch-attention" else args.ablation_scale


def run_ablations(path: Path, args, shape: ModelShape, ceilings, base_options: dict, workloads: list[str],
                  full_tokens: dict, full_engine: Engine | None, pool_bytes: int) -> list[Run]:
    """Each ablation on every workload, its tokens compared with the full engine's.  `full_engine` is None when
    the full engine's runs already cover the ablations' scales (it was freed, so the ablation has the same pool
    without sharing the device with it); else it runs the missing scales beside the ablation."""
    from .hf_anchor import agreement
    runs = []
    for name in args.ablations:
        scale = _ablation_scale(args, name)
        engine = _ablation_engine(path, {**base_options, **ABLATIONS[name]}, pool_bytes)
        warm_up(engine, shape.vocab)
        for workload in workloads:
            reqs = make_workload(workload, shape.vocab, scale)
            run, toks = time_engine(engine, reqs, shape, ceilings, workload, scale, name)
            if (workload, scale) not in full_tokens:  # the full engine at this scale too, for the comparison
                full_run, full_tokens[(workload, scale)] = time_engine(full_engine, reqs, shape, ceilings,
                                                                       workload, scale, "full")
                runs.append(full_run)
                _print(full_run)
            run.agreement_with_full = agreement(toks, full_tokens[(workload, scale)])
            runs.append(run)
            _print(run)
        del engine
        free_memory()
    return runs


def _ablation_engine(path: Path, options: dict, pool_bytes: int) -> Engine:
    """An engine with the full engine's KV pool (built beside it, it would get only the memory left); where that
    does not fit, the memory left, said (on a large model, give both less: --option kv_cache_fraction=0.4)."""
    try:
        return Engine(path, **{"kv_cache_bytes": pool_bytes, **options})
    except torch.OutOfMemoryError as error:
        print(f"note: an engine with the full engine's KV pool ran out of memory: {str(error).splitlines()[0]}",
              flush=True)
    free_memory()  # here, not in the except block: its traceback holds the half-built engine's tensors
    engine = Engine(path, **options)
    print(f"note: the full engine's KV pool does not fit beside it: this ablation has {engine.num_kv_pages} pages, "
          f"{engine.kv_cache_bytes / 2**30:.1f} GiB against {pool_bytes / 2**30:.1f}", flush=True)
    return engine


def run_kv_pool(path: Path, args, shape: ModelShape, ceilings, base_options: dict, workloads: list[str]) -> list[Run]:
    engine = Engine(path, **{**base_options, "kv_cache_bytes": int(args.kv_gib * 2**30)})
    warm_up(engine, shape.vocab)
    runs = []
    for workload in workloads:
        reqs = make_workload(workload, shape.vocab, args.kv_scale)
        run, _ = time_engine(engine, reqs, shape, ceilings, workload, args.kv_scale, f"kv{args.kv_gib:g}GiB")
        runs.append(run)
        _print(run)
    del engine
    free_memory()
    return runs


def run_hf(path: Path, args, shape: ModelShape, ceilings) -> list[dict]:
    from transformers import AutoModelForCausalLM

    from .hf_anchor import hf_static
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    rows = []
    for name in args.hf_workloads:
        reqs = make_workload(name, shape.vocab, args.hf_scale)
        hf_static(model, [type(r)(r.prompt_token_ids, 4, r.group) for r in reqs[:16]], args.hf_batch_size)
        seconds, tokens = hf_static(model, reqs, args.hf_batch_size)
        bound = lower_bound(shape, reqs, *ceilings)["seconds"]
        rows.append({"workload": name, "scale": args.hf_scale, "seconds": seconds, "bound_seconds": bound,
                     "share_of_bound": bound / seconds, "batch_size": args.hf_batch_size,
                     "complete": all(len(t) == r.max_tokens for t, r in zip(tokens, reqs))})
        print(f"transformers static {name} scale {args.hf_scale}: {seconds:.2f} s ({bound / seconds:.1%} of bound)",
              flush=True)
    del model
    free_memory()
    return rows


def _print(run: Run) -> None:
    busy = f" busy {run.gpu_busy_share:.0%}" if run.gpu_busy_share is not None else ""
    agree = f" identical {run.agreement_with_full['identical']:.0%}" if run.agreement_with_full else ""
    print(f"{run.variant:16s} {run.workload:20s} x{run.scale:<5g} {run.seconds:7.2f} s  {run.share_of_bound:6.1%} of "
          f"bound  {run.output_tokens_per_s:8.0f} tok/s  {run.steps:4d} steps  {run.mean_tokens_per_step:6.0f} tok/step  "
          f"host {run.host_ms_per_step:5.2f} ms/step  wait {run.wait_share:4.0%}{busy}{agree}"
          f"{f'  {run.graph_captures} captures' if run.graph_captures else ''}"
          f"{'' if run.complete else '  INCOMPLETE'}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1b", choices=sorted(SHAPES))
    ap.add_argument("--scales", type=floats, default=[0.25])
    ap.add_argument("--workloads", type=names, default=list(WORKLOADS))
    ap.add_argument("--busy-scale", type=float, default=0.25, help="scale whose runs get a GPU busy measurement")
    ap.add_argument("--ablations", type=names, default=[], help=f"comma list of {sorted(ABLATIONS)}")
    ap.add_argument("--ablation-scale", type=float, default=0.25)
    ap.add_argument("--torch-attention-scale", type=float, default=0.02)
    ap.add_argument("--kv-gib", type=float, default=None, help="also run with a fixed KV pool of this size")
    ap.add_argument("--kv-scale", type=float, default=1.0)
    ap.add_argument("--kv-workloads", type=names, default=["shared-instructions", "doc-qa", "skewed", "no-sharing"])
    ap.add_argument("--hf-workloads", type=names, default=[])
    ap.add_argument("--hf-scale", type=float, default=0.05)
    ap.add_argument("--hf-batch-size", type=int, default=64)
    ap.add_argument("--checkpoint", default=None, help="where to write (or find) the random-weight checkpoint")
    ap.add_argument("--profile", default=None, help="a workload to run once more under torch.profiler (trace)")
    ap.add_argument("--option", action="append", default=[], help="an engine option NAME=VALUE (JSON value)")
    ap.add_argument("--tiny", action="store_true", help="CPU check: tiny model, tiny scales, fp32")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    shape, path, base_options = _setup(args)
    ceilings = measured_ceilings(args.tiny)
    env = _environment(ceilings)
    print(f"{env}", flush=True)
    t = time.perf_counter()
    engine = Engine(path, **base_options)
    print(f"engine loaded (CUDA graphs captured) in {time.perf_counter() - t:.1f} s, {engine.num_kv_pages} KV pages, "
          f"{engine.max_num_batched_tokens} tokens per step, at most {engine.max_num_seqs} requests", flush=True)
    warm_up(engine, shape.vocab)
    runs, full_tokens = run_full(engine, args, shape, ceilings, args.workloads)
    if args.profile:
        from .profile import print_report, profile_generate
        reqs = make_workload(args.profile, shape.vocab, args.busy_scale)
        print_report(profile_generate(engine, [r.prompt_token_ids for r in reqs], params_of(reqs), args.out,
                                      f"{args.model}_{args.profile}"))
    pool_bytes = engine.kv_cache_bytes
    if all(_ablation_scale(args, name) in args.scales for name in args.ablations):
        dropped = weakref.ref(engine)
        del engine  # the full engine's tokens are known: each ablation gets the device with the same KV pool
        free_memory()
        print(f"full engine dropped: {release_report(dropped)}", flush=True)
        engine = None
    runs += run_ablations(path, args, shape, ceilings, base_options, args.workloads, full_tokens, engine, pool_bytes)
    del engine
    free_memory()
    if args.kv_gib:
        runs += run_kv_pool(path, args, shape, ceilings, base_options, args.kv_workloads)
    hf = run_hf(path, args, shape, ceilings) if args.hf_workloads and not args.tiny else []
    report = {**env, "model": args.model, "engine_options": base_options,
              "args": {k: v for k, v in vars(args).items() if k not in ("out", "checkpoint")},
              "runs": [asdict(r) for r in runs], "transformers_static": hf}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_engine_{args.model}.json").write_text(json.dumps(report, indent=1))
    return report


def _setup(args) -> tuple[ModelShape, Path, dict]:
    from .checkpoints import save_random_checkpoint, save_tiny_checkpoint
    if args.tiny:
        path = Path(args.checkpoint or tempfile.mkdtemp()) / "tiny"
        if not (path / "config.json").exists():
            save_tiny_checkpoint(path, 4096, max_position_embeddings=8192)
        shape = ModelShape.from_hf_config(json.loads((path / "config.json").read_text()))
        options = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 1 << 30}
        args.scales = [min(s, 0.02) for s in args.scales]
        args.busy_scale, args.ablation_scale, args.torch_attention_scale = -1, 0.02, 0.01
        args.kv_scale = 0.02
    else:
        shape = SHAPES[args.model]
        path = Path(args.checkpoint or tempfile.mkdtemp()) / args.model
        if not (path / "config.json").exists():
            t = time.perf_counter()
            save_random_checkpoint(path, args.model)
            print(f"checkpoint {args.model} written in {time.perf_counter() - t:.1f} s", flush=True)
        options = {"dtype": "bfloat16", "device": "cuda"}
    for item in args.option:
        name, _, value = item.partition("=")
        options[name] = json.loads(value)
    return shape, path, options


def _environment(ceilings: tuple[float, float]) -> dict[str, Any]:
    import transformers
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    env = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%d"), "tflops": ceilings[0] / 1e12, "bandwidth_tbs": ceilings[1] / 1e12}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


if __name__ == "__main__":
    main()
