"""The partition and memory-pressure benchmark's smoke mode on the CPU: the script runs end to end and its JSON
holds the figures and the token check (timings are not asserted: this is no timed test)."""
from __future__ import annotations

import json

import pytest

from batchllm_dask.bench.partitions import SMOKE_WORKLOAD, main, planner_partitions
from batchllm_dask.bench.workloads import make_workload
from batchllm_dask.planning import DEFAULT_PARTITION_TOKENS


def test_planner_partitions_hold_every_request_once_and_respect_the_bound():
    reqs = make_workload(SMOKE_WORKLOAD, 512, 2.0)
    whole, cost = planner_partitions(reqs, None)
    assert whole == [list(range(len(reqs)))]
    parts, _ = planner_partitions(reqs, int(cost / 4))
    assert len(parts) >= 4 and sorted(i for p in parts for i in p) == list(range(len(reqs)))
    assert planner_partitions(reqs, DEFAULT_PARTITION_TOKENS)[0] == whole  # too small to split at the default


@pytest.mark.slow
def test_smoke_run_writes_the_figures_and_finds_identical_tokens(tmp_path):
    report = main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_partitions_tiny.json").read_text())
    assert saved["tokens_identical"] is True and report["tokens_identical"] is True
    split = saved["splitting"]
    assert split["bounds"][str(DEFAULT_PARTITION_TOKENS)] == {"partitions": 1, "splits": False}
    assert split["cost_at_default"] is None  # the smoke workload is far below the default bound: said, not faked
    names = [v["name"] for v in split["variants"]]
    assert names[0] == "one call" and len(names) == 2 and split["variants"][1]["partitions"] >= 2
    kv = saved["memory_pressure"]
    assert kv["small_pool_pages"] <= max(kv["baseline_peak_kv_pages"] // 10, kv["largest_request_pages"])
    by_name = {v["name"]: v for v in kv["variants"]}
    assert by_name["KV / 10, reserve 0"]["preemptions"] > 0
    assert by_name["KV / 10, reserve 1"]["recomputed_tokens"] == 0
    for v in split["variants"] + kv["variants"]:
        assert v["identical_to_baseline"] and v["output_tokens"] > 0 and v["seconds"] > 0
        assert {"bound_seconds", "share_of_bound", "vs_baseline", "output_tokens_per_s"} <= v.keys()
    assert set(kv["slowdown"]) == {"KV / 10, reserve 1", "KV / 10, reserve 0"}


@pytest.mark.slow
def test_a_later_run_compares_with_an_earlier_runs_single_call(tmp_path):
    """--baseline: the split runs of a large model can be commands of their own, checked against the first's."""
    first = main(["--smoke", "--variants", "split", "--partition-tokens", "", "--out", str(tmp_path / "a")])
    assert [v["name"] for v in first["splitting"]["variants"]] == ["one call"]
    bound = str(int(first["splitting"]["planned_cost_tokens"] / 3))
    later = main(["--smoke", "--variants", "split", "--partition-tokens", bound, "--out", str(tmp_path / "b"),
                  "--baseline", str(tmp_path / "a" / "bench_partitions_tiny.json")])
    (variant,) = later["splitting"]["variants"]
    assert variant["partitions"] >= 2 and variant["identical_to_baseline"] and later["tokens_identical"]
    assert later["splitting"]["baseline"]["seconds"] == first["splitting"]["baseline"]["seconds"]
    assert variant["vs_baseline"] == pytest.approx(variant["seconds"] / first["splitting"]["baseline"]["seconds"] - 1)
