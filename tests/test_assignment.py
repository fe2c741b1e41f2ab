"""Cost-balanced assignment of planned partitions to GPU workers (assignment.py)."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from batchllm_dask.assignment import (PartitionPlacement, assign_plan, loads, lpt_assign, placement, plan_costs,
                                      plan_groups)
from batchllm_dask.planning import KEY, TARGET, assign_partitions, build_plan, partition_stats, token_column

costs_st = st.lists(st.floats(min_value=0, max_value=1000, allow_nan=False), min_size=0, max_size=7)


def optimum(costs: list[float], m: int) -> float:
    """The smallest possible maximum load, by brute force."""
    best = float("inf")
    for choice in itertools.product(range(m), repeat=len(costs)):
        load = [0.0] * m
        for c, w in zip(costs, choice):
            load[w] += c
        best = min(best, max(load))
    return best if costs else 0.0


@settings(max_examples=150, deadline=None)
@given(costs=costs_st, m=st.integers(min_value=1, max_value=3))
def test_lpt_is_within_grahams_bound_and_assigns_each_partition_once(costs, m):
    workers = [f"w{i}" for i in range(m)]
    mapping = lpt_assign(costs, workers)
    assert sorted(mapping) == list(range(len(costs)))  # every partition exactly once
    assert set(mapping.values()) <= set(workers)
    makespan = max(loads(mapping, costs).values(), default=0.0)
    assert makespan <= (4 / 3 - 1 / (3 * m)) * optimum(costs, m) + 1e-6


@settings(max_examples=100, deadline=None)
@given(costs=st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=2, max_size=12),
       m=st.integers(min_value=2, max_value=4), data=st.data())
def test_a_group_that_fits_stays_on_one_worker(costs, m, data):
    start = data.draw(st.integers(min_value=0, max_value=len(costs) - 2))
    stop = data.draw(st.integers(min_value=start + 2, max_value=len(costs)))
    group = list(range(start, stop))
    mapping = lpt_assign(costs, [f"w{i}" for i in range(m)], [group])
    assert sorted(mapping) == list(range(len(costs)))
    if sum(costs[p] for p in group) <= sum(costs) / m:
        assert len({mapping[p] for p in group}) == 1


def test_lpt_spreads_a_skewed_job():
    costs = [9.0, 1.0, 1.0, 1.0, 8.0, 1.0, 1.0]  # by count, one worker could get 9 + 8
    mapping = lpt_assign(costs, ["a", "b"])
    assert mapping[0] != mapping[4]
    assert loads(mapping, costs) == {"a": 11.0, "b": 11.0}


@pytest.mark.parametrize("costs, workers, together, word", [
    ([1.0], [], (), "workers"), ([1.0], ["a", "a"], (), "distinct"), ([-1.0], ["a"], (), "costs"),
    ([1.0, 1.0], ["a"], ([0, 1], [1]), "disjoint")])
def test_bad_input_is_refused(costs, workers, together, word):
    with pytest.raises(ValueError, match=word):
        lpt_assign(costs, workers, together)


def test_placement_annotation_matches_partition_keys_only():
    place = PartitionPlacement({0: "tcp://a:1", 2: "tcp://b:2"})
    assert place(("run_partition-abc", 2)) == ["tcp://b:2"]
    assert place(("anything-fused-xyz", 0)) == ["tcp://a:1"]
    assert place(("run_partition-abc", 1)) == [] and place("shuffle-barrier-1") == [] and place(("x", 0, 1)) == []


def _planned(rows: list[list[int]], npartitions: int, max_tokens: int = 4):
    part = pd.DataFrame({"i": range(len(rows))})
    part["_bl_tokens"] = token_column(rows, part.index)
    plan = build_plan(partition_stats(part, 16), npartitions, max_tokens, 16)
    return plan, assign_partitions(part, plan)


def test_plan_costs_sum_to_the_rows_costs_and_follow_the_rows():
    rng = np.random.default_rng(0)
    rows = []
    for g, size in enumerate([12, 3, 2]):
        head = list(rng.integers(0, 200, 48))
        rows += [head + list(rng.integers(0, 200, int(rng.integers(1, 9)))) for _ in range(size)]
    rows += [list(rng.integers(0, 200, 20)) for _ in range(5)]
    plan, part = _planned(rows, 3)
    costs = plan_costs(plan)
    # the total: each shared prefix once, every row's suffix and max_tokens
    row_cost = sum(len(r) for r in rows) + 4 * len(rows)
    saved = sum((len(part[part[KEY] == k]) - 1) * g.prefix_len for k, g in plan.groups.items() if k)
    assert sum(costs) == pytest.approx(row_cost - saved)
    whole = [k for k, g in plan.groups.items() if k and not g.split]
    for k in whole:  # a whole group's rows are in the partition its cost is counted in
        assert part[part[KEY] == k][TARGET].nunique() == 1
    assert all(len(g) > 1 for g in plan_groups(plan))
    mapping = assign_plan(plan, ["a", "b"])
    assert sorted(mapping) == list(range(plan.npartitions))


distributed = pytest.importorskip("distributed")


def _two_workers(**options):
    """A LocalCluster of two worker processes whose scheduler does not steal work.

    The placement is a preference (`allow_other_workers`), so the scheduler's work stealing may move a task off
    a busy worker; on a loaded CI machine it did (two partitions swapped).  These tests check where the placement
    sends each task, so they turn stealing off."""
    import dask
    with dask.config.set({"distributed.scheduler.work-stealing": False}):
        return distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                        **options)


def _where(part: pd.DataFrame) -> pd.DataFrame:
    from distributed import get_worker
    return pd.DataFrame({"worker": [get_worker().address], "rows": [len(part)]})


def test_local_cluster_runs_each_partition_on_its_assigned_worker():
    """Skewed partitions (row counts 9,1,1,1,8,1,1 as costs) on 2 worker processes: each runs where LPT put it,
    and the two workers' loads are equal (Dask alone balances by count)."""
    import dask.dataframe as dd
    sizes = [9, 1, 1, 1, 8, 1, 1]
    pdf = pd.DataFrame({"x": range(sum(sizes))})
    bounds = np.cumsum([0, *sizes])
    divisions = [int(b) for b in bounds[:-1]] + [int(bounds[-1]) - 1]
    ddf = dd.from_pandas(pdf, npartitions=1).repartition(divisions=divisions)
    assert ddf.npartitions == len(sizes)
    with _two_workers(resources={"GPU": 1}) as cluster, distributed.Client(cluster) as client:
        workers = sorted(client.scheduler_info()["workers"])
        mapping = lpt_assign([float(s) for s in sizes], workers)
        ran = ddf.map_partitions(_where, meta={"worker": "str", "rows": "int64"})
        with placement(mapping):
            out = ran.compute().reset_index(drop=True)
    assert out["rows"].tolist() == sizes
    assert out["worker"].tolist() == [mapping[p] for p in range(len(sizes))]
    assert sorted(out.groupby("worker")["rows"].sum().tolist()) == [11, 11]


def test_placement_holds_behind_a_p2p_shuffle():
    """P2P pins its own output partitions to workers; the tasks after it still run where the mapping says."""
    import dask.dataframe as dd
    sizes = [9, 1, 1, 1, 8, 1, 1]
    keys = np.repeat(np.arange(len(sizes)), sizes)
    pdf = pd.DataFrame({"t": keys, "s": [f"x{i}" for i in range(len(keys))]}).sample(frac=1, random_state=0)
    shuffled = dd.from_pandas(pdf, npartitions=4).set_index("t", divisions=list(range(len(sizes) + 1)),
                                                          shuffle_method="p2p")
    ran = shuffled.map_partitions(_where, meta={"worker": "str", "rows": "int64"}, clear_divisions=True)
    with _two_workers() as cluster, distributed.Client(cluster) as client:
        mapping = lpt_assign([float(s) for s in sizes], sorted(client.scheduler_info()["workers"]))
        with placement(mapping):
            out = ran.compute().reset_index(drop=True)
    assert out["rows"].tolist() == sizes
    assert out["worker"].tolist() == [mapping[p] for p in range(len(sizes))]


def test_generate_on_two_workers_follows_the_noted_plan(tiny_llama_dir):
    """The real path: plan, `note_plan`, compute inside `gpu_resources()`: every run_partition task runs on the
    worker the assignment chose, and the rows come back complete."""
    import batchllm_dask
    from batchllm_dask import planning
    from batchllm_dask.assignment import clear_placement, note_plan, pending_placement
    from _helpers import to_dask
    rows = [f"Task {b}: answer yes or no, and say why in one short line please. " * 2 + f"item {i}"
            for b, size in enumerate([6, 3, 2, 1]) for i in range(size)] + [f"q{i}?" for i in range(3)]
    ddf = to_dask(pd.DataFrame({"prompt": rows}), 3)
    model, n = str(tiny_llama_dir), 4
    with _two_workers(resources={"GPU": 1}) as cluster, distributed.Client(cluster) as client:
        tok = planning.tokenize(ddf, "prompt", model, chat=False)
        stats = tok.map_partitions(planning.partition_stats, 16, meta=planning._STATS_META).compute()
        mapping = note_plan(build_plan(stats, n, 4, 16))
        assert pending_placement() == mapping and len(set(mapping.values())) == 2
        out = ddf.llm.generate("prompt", model, npartitions=n, max_tokens=4, temperature=0.0, dtype="float32",
                               device="cpu", kv_cache_bytes=16 << 20)
        try:
            with distributed.get_task_stream(client) as stream, batchllm_dask.gpu_resources():
                result = out.compute()
        finally:
            clear_placement()
    ran = {t["key"][1]: t["worker"] for t in stream.data
           if isinstance(t["key"], tuple) and "run_partition" in t["key"][0]}
    assert ran == mapping
    assert len(result) == len(rows) and (result["finish_reason"] == "length").all()
