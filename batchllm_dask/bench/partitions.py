"""What bounded partitions and memory pressure cost: one engine, the same workload, beside the roofline bound.

(a) Splitting.  A Dask job runs each partition as one `Engine.generate` call; every call ends with a tail
    (its last requests decoding at a small batch) that one big call would have filled with other work.  The
    workload (workloads.py: token ids, greedy, EOS ignored) runs once as a single call, then split into the
    partitions the planner makes (planning.py's own `partition_stats`, `build_plan`, `assign_partitions` on
    a pandas frame, the whole workload as one input partition) at `planning.DEFAULT_PARTITION_TOKENS` and at
    smaller bounds, the partitions one after another on the same engine.  Reported: the time against the
    single call's, in % (the target is under 3% at the default bound).  The scale is chosen (unless given)
    so that the default bound makes at least two partitions; a bound that does not split the workload is
    reported as such.
(b) Memory pressure.  The workload (at --kv-scale) with a KV pool of a tenth of the pages the single call used
    at its peak, against that single call: the throughput ratio (target: within 2x), preemptions and
    recomputed tokens from the stats; with the default decode reserve (admission waits: nothing is
    recomputed) and with none (admission is optimistic: the pool runs dry and the newest request is
    preempted).
(c) Greedy tokens of every variant against the single call's: identical or not, and how far they agree.
    On the GPU in bf16 a different batch composition can flip a near-tie of a random-weight model; on the
    CPU in fp32 (--smoke) they must be identical.

Nothing here is a pass/fail test: it prints figures and writes JSON to --out (`bench_partitions_<model>.json`).

    python -m batchllm_dask.bench.partitions --model llama-1b --out results/   # (a), (b) and (c) in one run
    python -m batchllm_dask.bench.partitions --smoke --out /tmp/p  # CPU: the script itself, tiny model (CI)

On llama-8b the default bound needs a large workload to split at all (shared-instructions at scale 13:
26,656 requests, 6.0M planned cost tokens, 2 partitions at 4M and 7 at 1M; 4.3M unique prompt tokens and
1.7M output tokens), so each variant takes minutes; where one command may run 10 minutes, run them apart,
the later ones against the first one's single call (`--baseline`, same model and scale):

    python -m batchllm_dask.bench.partitions --model llama-8b --variants split --partition-tokens "" --out a/
    python -m batchllm_dask.bench.partitions --model llama-8b --variants split --partition-tokens 4000000 \
        --baseline a/bench_partitions_llama-8b.json --out b/
    python -m batchllm_dask.bench.partitions --model llama-8b --variants split --partition-tokens 1000000 \
        --baseline a/bench_partitions_llama-8b.json --out c/
    python -m batchllm_dask.bench.partitions --model llama-8b --variants kv --kv-scale 1 --out d/
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..planning import (DEFAULT_PARTITION_TOKENS, ERROR, TARGET, TOKENS, assign_partitions, build_plan,
                        partition_stats, token_column)
from ..roofline import SHAPES, ModelShape, lower_bound
from .cuda import free_memory, synchronize
from .workloads import Spec, make_workload, summary

SMOKE_WORKLOAD = Spec(n_systems=2, system_len=(32, 32), docs_per_system=1, doc_len=(0, 0), questions_per_doc=6,
                      question_len=(4, 8), output_len=6, description="smoke: 2 prefixes of 32 x 6 rows, 6 out")
_BLOCK = 16  # the planner's hash block (prefix_shuffle's default)


@dataclass
class Variant:
    """One way of running the workload: a single call, the planner's partitions, or a small KV pool."""

    name: str
    requests: int
    partitions: int
    seconds: float
    output_tokens: int
    output_tokens_per_s: float
    bound_seconds: float
    share_of_bound: float
    vs_baseline: float  # seconds / the single call's seconds - 1 (the cost of this variant)
    steps: int
    preemptions: int
    recomputed_tokens: int
    oom_retries: int
    kv_pages: int
    peak_kv_pages: int
    identical_to_baseline: bool
    agreement: dict


# ------------------------------------------------------------------------------------- the planner's partitions

def planner_partitions(reqs, partition_tokens: int | None, npartitions: int = 1) -> tuple[list[list[int]], float]:
    """(request indices of each partition the planner makes, the workload's planned cost in tokens).

    The planner's own functions on the workload as one pandas partition: prefix statistics, the global plan
    at `partition_tokens`, each row's target partition.  Empty partitions (none in practice) are dropped.
    """
    index = pd.RangeIndex(len(reqs))
    frame = pd.DataFrame({TOKENS: token_column([r.prompt_token_ids for r in reqs], index),
                          ERROR: pd.Series([None] * len(reqs), index=index, dtype=object)}, index=index)
    max_tokens = max(r.max_tokens for r in reqs)  # the planner takes one max_tokens; workloads have one
    plan = build_plan(partition_stats(frame, _BLOCK), npartitions, max_tokens, _BLOCK, partition_tokens)
    targets = assign_partitions(frame, plan)[TARGET].to_numpy()
    parts = [np.flatnonzero(targets == p).tolist() for p in range(plan.npartitions)]
    return [p for p in parts if p], plan.partition_cost * plan.npartitions


def auto_scale(workload: str | Spec, vocab: int, bound: int, partitions: float = 1.6) -> float:
    """The scale at which the planned cost is `partitions` times `bound` (so the default bound splits it in 2)."""
    _, cost = planner_partitions(make_workload(workload, vocab, 1.0), None)
    return partitions * bound / cost


# ------------------------------------------------------------------------------------- running

def _params(reqs):
    from ..engine import SamplingParams
    return [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in reqs]


def run_parts(engine, reqs, parts: list[list[int]]) -> tuple[float, list[list[int]], dict[str, int]]:
    """Each partition as one `generate` call, one after another: (seconds, tokens by request, summed stats)."""
    tokens: list[list[int]] = [[] for _ in reqs]
    totals = {"steps": 0, "preemptions": 0, "recomputed_tokens": 0, "oom_retries": 0, "peak_kv_pages": 0}
    synchronize()
    start = time.perf_counter()
    for part in parts:
        outs = engine.generate([reqs[i].prompt_token_ids for i in part], _params([reqs[i] for i in part]))
        for i, out in zip(part, outs):
            tokens[i] = out.token_ids
        s = engine.last_stats
        for key in ("steps", "preemptions", "recomputed_tokens", "oom_retries"):
            totals[key] += getattr(s, key)
        totals["peak_kv_pages"] = max(totals["peak_kv_pages"], s.peak_kv_pages)
    synchronize()
    return time.perf_counter() - start, tokens, totals


def digests(tokens: list[list[int]]) -> list[str]:
    """A short hash of each request's tokens: what a later run (--baseline) compares its tokens with."""
    return [hashlib.sha1(np.asarray(t, dtype=np.int64).tobytes()).hexdigest()[:16] for t in tokens]


@dataclass
class Baseline:
    """The single call's seconds and tokens (None when read from an earlier run's JSON: digests only)."""

    seconds: float
    digests: list[str]
    tokens: list[list[int]] | None = None


def measure(name: str, engine, reqs, parts, shape: ModelShape, ceilings,
            baseline: Baseline | None) -> tuple[Variant, Baseline]:
    """Run `reqs` as `parts` on `engine`: a `Variant` against `baseline` (itself when None), and its own run."""
    from .hf_anchor import agreement
    seconds, tokens, totals = run_parts(engine, reqs, parts)
    mine = Baseline(seconds, digests(tokens), tokens)
    base = baseline or mine
    out = summary(reqs)["output_tokens"]
    bound = lower_bound(shape, reqs, *ceilings)["seconds"]
    same = [a == b for a, b in zip(mine.digests, base.digests)]
    agree = agreement(tokens, base.tokens) if base.tokens is not None else {"identical": sum(same) / len(same)}
    variant = Variant(name, len(reqs), len(parts), seconds, out, out / seconds, bound, bound / seconds,
                      seconds / base.seconds - 1, totals["steps"], totals["preemptions"], totals["recomputed_tokens"],
                      totals["oom_retries"], engine.num_kv_pages, totals["peak_kv_pages"],
                      len(same) == len(reqs) and all(same), agree)
    complete = all(len(t) == r.max_tokens for t, r in zip(tokens, reqs))
    print(f"{name:26s} {len(parts):4d} part. {seconds:8.2f} s {out / seconds:9.0f} tok/s {bound / seconds:6.1%} of bound"
          f"  {variant.vs_baseline:+7.2%} vs one call  {totals['preemptions']:5d} preempt. "
          f"{totals['recomputed_tokens']:7d} recomputed  {'identical' if variant.identical_to_baseline else 'DIFFERENT'}"
          f"{'' if complete else '  INCOMPLETE'}", flush=True)
    return variant, mine


def splitting(engine, args, shape, ceilings) -> tuple[list[Variant], dict[str, Any], tuple]:
    """(a): the single call (or an earlier run's, --baseline), then the planner's partitions at each bound.

    Also returns (reqs, the single call's Variant or None, its Baseline) for (b).
    """
    reqs = make_workload(args.workload, shape.vocab, args.scale)
    whole, cost = planner_partitions(reqs, None)
    info: dict[str, Any] = {"scale": args.scale, "requests": len(reqs), "planned_cost_tokens": cost, "bounds": {}}
    if args.baseline:
        saved = json.loads(Path(args.baseline).read_text())["splitting"]
        if (saved["scale"], saved["requests"]) != (args.scale, len(reqs)):
            raise SystemExit(f"--baseline {args.baseline}: scale {saved['scale']} and {saved['requests']} requests, "
                             f"this run {args.scale} and {len(reqs)}")
        base, variants = None, []
        baseline = Baseline(saved["baseline"]["seconds"], saved["baseline"]["digests"])
        print(f"one call: {baseline.seconds:.2f} s, from {args.baseline}", flush=True)
    else:
        base, baseline = measure("one call", engine, reqs, whole, shape, ceilings, None)
        variants = [base]
    info["baseline"] = {"seconds": baseline.seconds, "digests": baseline.digests}
    for bound in args.partition_tokens:
        parts, _ = planner_partitions(reqs, bound)
        label = "default" if bound == DEFAULT_PARTITION_TOKENS else f"{bound:,}"
        info["bounds"][str(bound)] = {"partitions": len(parts), "splits": len(parts) > 1}
        if len(parts) == 1:
            print(f"partition bound {bound:,} ({label}): the workload's {cost:,.0f} cost tokens fit in one partition, "
                  f"nothing to measure", flush=True)
            continue
        variant, _ = measure(f"partitions @ {label}", engine, reqs, parts, shape, ceilings, baseline)
        info["bounds"][str(bound)]["cost"] = variant.vs_baseline
        variants.append(variant)
    return variants, info, (reqs, base, baseline)


def kv_baseline(engine, args, shape, ceilings, split_baseline: tuple | None) -> tuple:
    """(b)'s reference: the single call at --kv-scale on the full pool ((a)'s own when the scale is the same)."""
    if split_baseline is not None and split_baseline[1] is not None and args.kv_scale == args.scale:
        return split_baseline
    reqs = make_workload(args.workload, shape.vocab, args.kv_scale)
    base, baseline = measure("one call (full KV pool)", engine, reqs, planner_partitions(reqs, None)[0], shape,
                             ceilings, None)
    return reqs, base, baseline


def small_pools(path, options, baseline: tuple, page: tuple[int, int], shape, ceilings,
                workload: str | Spec) -> tuple[list[Variant], dict]:
    """(b): the baseline's requests on engines whose KV pool is a tenth of the pages the baseline peaked at,
    with the default decode reserve and with none.  page: (bytes, tokens) of one KV page."""
    from ..engine import Engine
    reqs, base, reference = baseline
    page_bytes, page_size = page
    largest = max(math.ceil((len(r.prompt_token_ids) + r.max_tokens) / page_size) for r in reqs)
    pages = max(base.peak_kv_pages // 10, largest)
    info = {"scale": None, "requests": len(reqs), "baseline_seconds": base.seconds,
            "baseline_peak_kv_pages": base.peak_kv_pages, "small_pool_pages": pages, "largest_request_pages": largest,
            "ratio_to_peak": pages / base.peak_kv_pages, "slowdown": {}}
    print(f"KV pool: the single call peaked at {base.peak_kv_pages} pages; the small pool has {pages} "
          f"({pages / base.peak_kv_pages:.1%}; the largest request needs {largest})", flush=True)
    variants = []
    for reserve in (1.0, 0.0):
        small = Engine(path, **{**options, "kv_cache_bytes": pages * page_bytes, "decode_reserve": reserve})
        warm_up(small, shape.vocab, workload)
        variant, _ = measure(f"KV / 10, reserve {reserve:g}", small, reqs, [list(range(len(reqs)))], shape,
                             ceilings, reference)
        info["slowdown"][variant.name] = variant.seconds / base.seconds
        variants.append(variant)
        del small
        free_memory()
    return variants, info


def warm_up(engine, vocab: int, workload: str | Spec = SMOKE_WORKLOAD) -> None:
    """Compile the kernels (prefill with shared prefixes, decodes) on requests no measured run has (seed 7)."""
    for spec, scale in ((SMOKE_WORKLOAD, 1.0), (workload, 0.05))[:1 if workload is SMOKE_WORKLOAD else 2]:
        reqs = make_workload(spec, vocab, scale, seed=7)
        engine.generate([r.prompt_token_ids for r in reqs], _params(reqs))


# ------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(float(x)) for x in s.split(",") if x]  # noqa: E731
    names = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-8b", choices=sorted(SHAPES))
    ap.add_argument("--workload", default="shared-instructions")
    ap.add_argument("--scale", type=float, default=None,
                    help="workload scale for (a); default: the default bound splits it into 2 partitions")
    ap.add_argument("--kv-scale", type=float, default=1.0, help="workload scale for (b)")
    ap.add_argument("--partition-tokens", type=ints, default=None,
                    help="partition bounds (cost tokens) to split at, comma-separated; default: the planner's "
                         "default and 1,000,000 (--smoke: the default and one that splits the tiny workload)")
    ap.add_argument("--variants", type=names, default=["split", "kv"], help="split (a), kv (b), or both")
    ap.add_argument("--baseline", default=None,
                    help="an earlier run's JSON whose single call (same model and scale) (a) compares with, instead "
                         "of running it again: on llama-8b the single call and the split runs take some 6 minutes "
                         "each, so each can be its own command")
    ap.add_argument("--checkpoint", default=None, help="where to write (or find) the random-weight checkpoint")
    ap.add_argument("--option", action="append", default=[], help="an engine option NAME=VALUE (JSON value)")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny model, tiny workload, fp32")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    return ap.parse_args(argv)


def _setup(args) -> tuple[ModelShape, Path, dict, tuple[float, float]]:
    from .checkpoints import save_random_checkpoint, save_tiny_checkpoint
    if args.smoke:
        path = Path(args.checkpoint or tempfile.mkdtemp()) / "tiny"
        if not (path / "config.json").exists():
            save_tiny_checkpoint(path, 512)
        shape = ModelShape.from_hf_config(json.loads((path / "config.json").read_text()))
        args.workload, args.kv_scale = SMOKE_WORKLOAD, 1.0
        args.scale = args.scale or 1.0
        cost = planner_partitions(make_workload(SMOKE_WORKLOAD, shape.vocab, args.scale), None)[1]
        # The default bound cannot split a workload this small: it is kept (reported as not splitting) and two
        # bounds that do are added.
        if args.partition_tokens is None:
            args.partition_tokens = [DEFAULT_PARTITION_TOKENS, int(cost / 2.5)]
        options = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 64 << 20, "page_size": 8}
        ceilings = (790e12, 4.3e12)  # nominal H200 figures: on the CPU the bound is only printed
    else:
        shape = SHAPES[args.model]
        path = Path(args.checkpoint or tempfile.mkdtemp()) / args.model
        if not (path / "config.json").exists():
            save_random_checkpoint(path, args.model)
        if args.scale is None:
            args.scale = auto_scale(args.workload, shape.vocab, DEFAULT_PARTITION_TOKENS)
        options = {"dtype": "bfloat16", "device": "cuda"}
        if args.partition_tokens is None:
            args.partition_tokens = [DEFAULT_PARTITION_TOKENS, 1_000_000]
        from .hf_anchor import ceilings as measured
        ceilings = measured()
    for item in args.option:
        name, _, value = item.partition("=")
        options[name] = json.loads(value)
    return shape, path, options, ceilings


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    shape, path, options, ceilings = _setup(args)
    from ..engine import Engine
    from .engine import _environment
    env = _environment(ceilings)
    print(env, flush=True)
    engine = Engine(path, **options)
    warm_up(engine, shape.vocab, args.workload)
    report: dict[str, Any] = {**env, "model": "tiny" if args.smoke else args.model, "engine_options": options,
                              "workload": args.workload if isinstance(args.workload, str) else asdict(args.workload),
                              "default_partition_tokens": DEFAULT_PARTITION_TOKENS,
                              "max_num_batched_tokens": engine.max_num_batched_tokens}
    variants: list[Variant] = []
    split_baseline = None
    if "split" in args.variants:
        split, report["splitting"], split_baseline = splitting(engine, args, shape, ceilings)
        variants += split
        report["splitting"]["variants"] = [asdict(v) for v in split]
        report["splitting"]["cost_at_default"] = report["splitting"]["bounds"][str(DEFAULT_PARTITION_TOKENS)].get(
            "cost") if str(DEFAULT_PARTITION_TOKENS) in report["splitting"]["bounds"] else None
    if "kv" in args.variants:
        baseline = kv_baseline(engine, args, shape, ceilings, split_baseline)
        page = (engine._page_bytes(), engine.config.page_size)
        del engine  # its pool must go before the small-pool engines take theirs
        free_memory()
        kv, report["memory_pressure"] = small_pools(path, options, baseline, page, shape, ceilings,
                                                       args.workload)
        report["memory_pressure"]["scale"] = args.kv_scale
        report["memory_pressure"]["variants"] = [asdict(v) for v in [baseline[1], *kv]]
        if baseline is not split_baseline:
            variants.append(baseline[1])
        variants += kv
    report["tokens_identical"] = all(v.identical_to_baseline for v in variants)
    shares = ", ".join(f"{v.name}: {v.agreement.get('identical', 1.0):.1%}" for v in variants
                       if not v.name.startswith("one call"))
    print(f"greedy tokens identical across all variants: {'yes' if report['tokens_identical'] else 'NO'}"
          f" (requests identical to the single call: {shares})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench_partitions_{report['model']}.json").write_text(json.dumps(report, indent=1, default=str))
    return report


if __name__ == "__main__":
    main()
