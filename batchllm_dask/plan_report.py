"""What a job will cost, before it runs: `PlanReport` (`ddf.llm.plan_report(...)`, `batchllm-dask plan`).

A dry run: the prompts are tokenized and planned exactly as `generate` does
(planning.py's prefix-aware shuffle), but no weights load.  Per output
partition it counts the prompt tokens the engine will compute after prefix
sharing with the engine's own prefix tree (engine/prefix_tree.py, pure Python),
so the figure is the one the run reports; the prefix groups are the planner's
(rows with one longest shared prefix key).  The time is a lower bound (roofline.py:
the physical limit of FLOPs and bytes on the device) for the model's shape, per
partition, and a partition is what one GPU runs.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from .planning import DEFAULT_PARTITION_TOKENS, ERROR, KEY, KEY_LEN, TOKENS, token_arrays
from .roofline import ModelShape, lower_bound

# Dense bf16 matrix peak (FLOP/s) and memory bandwidth (bytes/s) from the datasheets (SXM parts): a bound on
# the bound.  `--device measured` measures this machine instead (`measure_device`).
DEVICES: dict[str, tuple[float, float]] = {"h100": (989e12, 3.35e12), "h200": (989e12, 4.8e12),
                                           "a100": (312e12, 2.0e12)}


@dataclass(frozen=True)
class _Request:
    prompt_token_ids: list[int]
    max_tokens: int


@dataclass(frozen=True)
class PartitionCost:
    """One output partition: what one engine call computes, and the least time it can take."""

    partition: int
    rows: int
    prompt_tokens: int
    computed_prompt_tokens: int
    cost: float            # computed prompt tokens + rows x max_tokens: the planner's unit
    lower_bound_seconds: float


@dataclass(frozen=True)
class PlanReport:
    """The cost of a `generate` job on `device`, from its plan."""

    rows: int
    error_rows: int
    prompt_tokens: int
    computed_prompt_tokens: int
    max_tokens: int
    device: str
    partitions: list[PartitionCost] = field(default_factory=list)
    group_sizes: dict[str, int] = field(default_factory=dict)    # "8-15 rows" -> number of prefix groups
    largest_groups: list[tuple[int, int]] = field(default_factory=list)  # (rows, shared prefix tokens)

    @property
    def saved_share(self) -> float:
        return 1 - self.computed_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def lower_bound_seconds(self) -> float:
        """The job's bound with one GPU per partition: its slowest partition."""
        return max((p.lower_bound_seconds for p in self.partitions), default=0.0)

    def __str__(self) -> str:
        lines = [f"rows                   {self.rows:,} ({self.error_rows:,} with errors, not run)",
                 f"prompt tokens          {self.prompt_tokens:,}",
                 f"left after sharing     {self.computed_prompt_tokens:,} (prefix sharing saves {self.saved_share:.1%})",
                 f"output tokens at most  {(self.rows - self.error_rows) * self.max_tokens:,} "
                 f"(max_tokens {self.max_tokens})",
                 "prefix groups by size  " + (", ".join(f"{n} of {k}" for k, n in self.group_sizes.items()) or "none")]
        if self.largest_groups:
            lines.append("largest groups         " + ", ".join(f"{r} rows x {t} tokens" for r, t in self.largest_groups))
        lines.append(f"partitions             {len(self.partitions)} (one engine call, one GPU each)")
        lines.append("  partition     rows   prompt tok   computed tok      cost   lower bound")
        lines += [f"  {p.partition:9d} {p.rows:8,d} {p.prompt_tokens:12,d} {p.computed_prompt_tokens:14,d} "
                  f"{p.cost:9,.0f} {p.lower_bound_seconds:11.3g} s" for p in self.partitions]
        lines.append(f"lower bound per GPU    {self.lower_bound_seconds:.3g} s on {self.device} "
                     "(no engine runs faster; expect a few times more)")
        return "\n".join(lines)


def _size_bucket(rows: int) -> str:
    low = 1 << (rows.bit_length() - 1)
    return f"{low} rows" if low == 1 else f"{low}-{2 * low - 1} rows"


def summarize_partition(part: pd.DataFrame, number: int, max_tokens: int, min_shared_tokens: int) -> dict[str, Any]:
    """The counts of one planned partition (its rows carry TOKENS, ERROR, KEY, KEY_LEN)."""
    from .engine.prefix_tree import build_prefix_plan
    ids = [list(map(int, a)) for a, e in zip(token_arrays(part[TOKENS]), part[ERROR]) if a is not None and e is None]
    plan = build_prefix_plan(ids, min_shared_tokens)
    lens = [len(r) for r in ids]
    keyed = part[part[KEY] != 0]
    groups = keyed.groupby(KEY)[KEY_LEN].agg(["size", "first"])
    return {"partition": number, "rows": len(part), "errors": len(part) - len(ids), "prompt_tokens": sum(lens),
            "computed": plan.computed_prompt_tokens(lens) if ids else 0,
            "groups": {int(k): (int(r["size"]), int(r["first"])) for k, r in groups.iterrows()},
            "requests": [_Request(r, max_tokens) for r in ids]}


def build_report(parts: list[dict[str, Any]], shape: ModelShape, max_tokens: int, device: str,
                 peak_flops: float, bandwidth: float) -> PlanReport:
    groups: dict[int, list[int]] = {}
    for p in parts:  # a big group split over partitions is still one group
        for key, (rows, length) in p["groups"].items():
            groups.setdefault(key, [0, length])[0] += rows
    sizes = Counter(_size_bucket(rows) for rows, _ in groups.values())
    costs = [PartitionCost(p["partition"], p["rows"], p["prompt_tokens"], p["computed"],
                           float(p["computed"] + len(p["requests"]) * max_tokens),
                           lower_bound(shape, p["requests"], peak_flops, bandwidth)["seconds"] if p["requests"] else 0.0)
             for p in parts]
    return PlanReport(rows=sum(p["rows"] for p in parts), error_rows=sum(p["errors"] for p in parts),
                      prompt_tokens=sum(p["prompt_tokens"] for p in parts),
                      computed_prompt_tokens=sum(p["computed"] for p in parts), max_tokens=max_tokens, device=device,
                      partitions=costs,
                      group_sizes={k: sizes[k] for k in sorted(sizes, key=lambda s: int(s.split()[0].split("-")[0]))},
                      largest_groups=sorted((tuple(g) for g in groups.values()), reverse=True)[:5])


def measure_device() -> tuple[str, float, float]:
    """(name, matrix FLOP/s, copy bytes/s) measured on this machine's torch device (bf16 on CUDA, fp32 on CPU)."""
    import time

    import torch
    cuda = torch.cuda.is_available()
    device, dtype, n = ("cuda", torch.bfloat16, 8192) if cuda else ("cpu", torch.float32, 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(1 << (28 if cuda else 24), device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)

    def best(fn: Any, repeat: int = 5) -> float:
        times = []
        for _ in range(repeat):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)
    flops = 2 * n ** 3 / best(lambda: a @ a)
    bandwidth = 2 * src.numel() / best(lambda: dst.copy_(src))  # read + write
    name = torch.cuda.get_device_name() if cuda else "this CPU"
    return f"{name} (measured)", flops, bandwidth


def device_ceilings(device: str) -> tuple[str, float, float]:
    """(name, FLOP/s, bytes/s) of a device name of `DEVICES` or "measured"."""
    if device == "measured":
        return measure_device()
    if device not in DEVICES:
        raise ValueError(f"device: must be one of {sorted(DEVICES) + ['measured']}, got {device!r}")
    return (device, *DEVICES[device])


def plan_report(ddf: Any, prompt_col: str, model: str, *, chat: bool = False, max_tokens: int = 16,
                npartitions: int | None = None, partition_tokens: int | None = DEFAULT_PARTITION_TOKENS,
                device: str = "h100", min_shared_tokens: int = 32) -> PlanReport:
    """Tokenize and plan `ddf` as `generate` would (no weights load) and report what the job costs."""
    import dask
    from .accessor import _check_args, _check_column, default_npartitions
    from .caches import EngineSpec
    from .engine.loader import read_config
    from .engine.model_cache import tokenizer_dir
    from .planning import prefix_shuffle, tokenize
    _check_args("x", chat, npartitions, partition_tokens)
    _check_column(ddf.columns, prompt_col)
    name, peak, bandwidth = device_ceilings(device)
    path = EngineSpec.make(str(model), {}).model
    shape = ModelShape.from_hf_config(read_config(tokenizer_dir(path)))
    n = npartitions or default_npartitions(ddf)
    planned = prefix_shuffle(tokenize(ddf, prompt_col, path, chat=chat), max_tokens=max_tokens, npartitions=n,
                             partition_tokens=partition_tokens)
    tasks = [dask.delayed(summarize_partition)(part, i, max_tokens, min_shared_tokens)
             for i, part in enumerate(planned.to_delayed())]
    return build_report(list(dask.compute(*tasks)), shape, max_tokens, name, peak, bandwidth)
