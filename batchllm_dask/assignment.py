"""Data parallel: which GPU worker runs which planned partition, so that the GPUs finish together.

Dask places a task by data locality and by estimated occupancy; before the
first partition finishes it knows nothing of their durations, so it balances
by *count*.  Partitions of unequal cost (a prefix group that fits stays whole
in one partition, and bounded partitions leave a remainder) then leave one GPU
idle while another finishes a straggler.  Here each partition's estimated cost
(prompt tokens after sharing plus max_tokens per row, the planner's measure) is
known, and the longest-processing-time rule places them:

1. units: a set of partitions cut from one prefix group (`plan_groups`) is
   one unit where its cost fits in a worker's fair share (total / workers),
   so that a group's rows stay on one worker; otherwise each partition is a unit;
2. units by decreasing cost, each to the worker with the least load so far.

Graham's bound: the busiest worker's load is at most (4/3 - 1/(3m)) times the
optimum over m workers (tests/test_assignment.py checks it against brute force).

The mapping is applied when the graph is submitted (Dask's expression layer
keeps no per-task annotations): `placement(mapping)` enters
`dask.annotate(workers=PartitionPlacement(mapping), allow_other_workers=True)`.
The callable runs on the scheduler for every task key: a key
(name, i) with i a planned partition goes to that partition's worker.  Every
partition-numbered task of the graph follows the same rule, the reading and
tokenizing tasks of input partition i included: they only move where they run.
`allow_other_workers` makes it a preference: a task whose worker is gone runs
elsewhere, and the scheduler's work stealing may move one off a busy worker.  `worker.gpu_resources()` enters it for the placement that
`note_plan` recorded.  Nothing here imports torch or dask at module level.
"""
from __future__ import annotations

import heapq
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def lpt_assign(costs: Sequence[float], workers: Sequence[str],
               together: Sequence[Sequence[int]] = ()) -> dict[int, str]:
    """Partition index -> worker, by the longest-processing-time rule (see the module docstring).

    costs: estimated cost of each partition (>= 0).  workers: distinct worker
    names or addresses, in order of preference for ties.  together: disjoint
    sets of partitions that go to one worker where their total cost fits in
    total / len(workers).
    """
    if not workers:
        raise ValueError("workers: need at least one worker")
    if len(set(workers)) != len(workers):
        raise ValueError(f"workers: must be distinct, got {list(workers)}")
    if any(not c >= 0 for c in costs):
        raise ValueError(f"costs: must be numbers >= 0, got {list(costs)}")
    loads = [(0.0, w) for w in range(len(workers))]  # a heap of (load, worker position)
    out: dict[int, str] = {}
    for cost, members in _units(costs, len(workers), together):
        load, w = heapq.heappop(loads)
        for p in members:
            out[p] = workers[w]
        heapq.heappush(loads, (load + cost, w))
    return out


def _units(costs: Sequence[float], n_workers: int, together: Sequence[Sequence[int]]) -> list[tuple[float, list[int]]]:
    """(cost, partitions) of every unit, largest first (ties: lower partition first)."""
    share = sum(costs) / n_workers
    grouped: set[int] = set()
    units = []
    for members in together:
        members = sorted(set(members))
        if any(p in grouped or not 0 <= p < len(costs) for p in members):
            raise ValueError(f"together: sets must be disjoint partition indexes < {len(costs)}, got {together}")
        grouped.update(members)
        cost = sum(costs[p] for p in members)
        if cost <= share:
            units.append((cost, members))
        else:
            units.extend((costs[p], [p]) for p in members)
    units.extend((c, [p]) for p, c in enumerate(costs) if p not in grouped)
    return sorted(units, key=lambda u: (-u[0], u[1][0]))


def loads(mapping: dict[int, str], costs: Sequence[float]) -> dict[str, float]:
    """Each worker's total cost under `mapping`."""
    out: dict[str, float] = {}
    for p, w in mapping.items():
        out[w] = out.get(w, 0.0) + costs[p]
    return out


# ----------------------------------------------------------------------------- from the planner's plan

def plan_costs(plan: Any) -> list[float]:
    """Each output partition's estimated cost under a `planning.PrefixPlan` (its cost line, cut as it is).

    A group that fits goes whole to the partition holding its middle; a split
    group (and the unshared rows) spreads over the partitions its span crosses.
    """
    n, width = plan.npartitions, plan.partition_cost
    costs = [0.0] * n
    for g in plan.groups.values():
        if not g.split:
            costs[plan.target(g.start + g.cost / 2)] += g.cost
            continue
        for p in range(plan.target(g.start), plan.target(g.start + g.cost) + 1):
            lo = -float("inf") if p == 0 else p * width
            hi = float("inf") if p == n - 1 else (p + 1) * width
            costs[p] += max(0.0, min(hi, g.start + g.cost) - max(lo, g.start))
    return costs


def plan_groups(plan: Any) -> list[list[int]]:
    """Sets of partitions that one shared prefix group spans (split groups), merged where they overlap."""
    spans = sorted((plan.target(g.start), plan.target(g.start + g.cost)) for key, g in plan.groups.items()
                   if key != 0 and g.split)
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][-1]:
            merged[-1] = list(range(merged[-1][0], max(hi, merged[-1][-1]) + 1))
        else:
            merged.append(list(range(lo, hi + 1)))
    return [m for m in merged if len(m) > 1]


def assign_plan(plan: Any, workers: Sequence[str]) -> dict[int, str]:
    """The planned partitions of `plan` over `workers`, prefix groups kept together where they fit."""
    return lpt_assign(plan_costs(plan), workers, plan_groups(plan))


# ----------------------------------------------------------------------------- applying it in Dask

class PartitionPlacement:
    """Dask `workers` annotation: key (name, i) of a planned partition i -> [its worker]; any other key -> []."""

    def __init__(self, mapping: dict[int, str]):
        self.mapping = dict(mapping)

    def __call__(self, key: Any) -> list[str]:
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[1], int) and key[1] in self.mapping:
            return [self.mapping[key[1]]]
        return []  # no restriction


@contextmanager
def placement(mapping: dict[int, str] | None) -> Iterator[bool]:
    """Compute inside: partition i runs on mapping[i] (a preference); yields whether a mapping applied."""
    if not mapping:
        yield False
        return
    import dask
    with dask.annotate(workers=PartitionPlacement(mapping), allow_other_workers=True):
        yield True


_pending: dict[int, str] | None = None


def gpu_workers(client: Any) -> list[str]:
    """Addresses of the client's workers that declare a GPU resource, else of all its workers, sorted."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    gpus = sorted(a for a, w in workers.items() if (w.get("resources") or {}).get("GPU", 0) >= 1)
    return gpus or sorted(workers)


def note_plan(plan: Any, client: Any = None) -> dict[int, str] | None:
    """Record the placement of `plan`'s partitions over the client's (GPU) workers, for `pending_placement`.

    Nothing is recorded (and None returned) without a client or with fewer
    than two workers: one worker runs everything anyway.
    """
    global _pending
    if client is None:
        try:
            from distributed import default_client
            client = default_client()
        except (ImportError, ValueError):
            client = None
    workers = gpu_workers(client) if client is not None else []
    _pending = assign_plan(plan, workers) if len(workers) >= 2 else None
    return _pending


def pending_placement() -> dict[int, str] | None:
    """The placement `note_plan` recorded last (None if none)."""
    return _pending


def clear_placement() -> None:
    """Forget the recorded placement (later computes place partitions as Dask likes)."""
    global _pending
    _pending = None
