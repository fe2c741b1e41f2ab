"""End to end on a distributed.LocalCluster of 2 worker processes, with the real engine on a tiny checkpoint.

The workers declare a "GPU" resource (as GPU workers would), so every compute
runs inside `batchllm_dask.gpu_resources()`, which annotates the graph with
resources={"GPU": 1}; the engine itself runs on the CPU.
"""
from __future__ import annotations

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import batchllm_dask
import batchllm_dask.planning
from batchllm_dask.engine import Engine, SamplingParams
from _helpers import to_dask
from batchllm_dask.caches import engine_loads
from batchllm_dask.worker import PAUSE_PROFILER, profiler_paused

distributed = pytest.importorskip("distributed")

ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 32 << 20}
SAMPLING = {"max_tokens": 6, "temperature": 0.0}


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={"GPU": 1},
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c


def prompts(seed: int = 0) -> pd.DataFrame:
    """Four instruction blocks of different sizes, unshared rows, bad rows; rows in a shuffled order."""
    rng = np.random.default_rng(seed)
    rows: list[object] = []
    group: list[int] = []
    for b, size in enumerate([10, 6, 4, 2]):
        block = f"Task {b}: read the product review and answer positive or negative, with one reason. " * 2
        for i in range(size):
            rows.append(block + f"Review {b}.{i}: " + "fine " * int(rng.integers(1, 5)))
            group.append(b)
    for i in range(4):
        rows.append(f"{i} unrelated question number {i}?")
        group.append(-1)
    rows += [None, "", 7, "z" * 2100]
    group += [-2] * 4
    df = pd.DataFrame({"prompt": pd.Series(rows, dtype=object), "group": group})
    df.index = pd.Index(np.arange(len(df)) * 10 + 5, name="key")
    return df.sample(frac=1.0, random_state=seed)


@pytest.fixture(scope="module")
def model(tiny_llama_dir) -> str:
    return str(tiny_llama_dir)


@pytest.mark.parametrize("npartitions,task", [(2, "run_partition"), (1, "generate_partition")])
def test_generate_tasks_carry_the_gpu_resource_when_workers_declare_gpus(client, model, npartitions, task):
    out = to_dask(prompts(), 2).llm.generate("prompt", model, npartitions=npartitions, **SAMPLING, **ENGINE)
    with batchllm_dask.gpu_resources() as annotated:
        assert annotated is True and dask.get_annotations()["resources"] == {"GPU": 1}
        persisted = out.persist()
    distributed.wait(persisted)
    tasks = client.cluster.scheduler.tasks
    keys = [k for k in tasks if task in str(k)]
    assert keys and all(tasks[k].resource_restrictions == {"GPU": 1} for k in keys)
    del persisted


def test_completions_match_the_direct_engine_call_row_for_row(client, model):
    df = prompts()
    out = to_dask(df, 4).llm.generate("prompt", model, npartitions=3, **SAMPLING, **ENGINE)
    with batchllm_dask.gpu_resources():
        result = out.compute()
    direct = Engine(model, **ENGINE).generate(df["prompt"].tolist(), SamplingParams(**SAMPLING))
    result = result.loc[df.index]
    assert len(result) == len(df)
    assert result["finish_reason"].tolist() == [o.finish_reason for o in direct]
    ok = (result["finish_reason"] != "error").to_numpy()
    assert result["completion"][ok].tolist() == [o.text for o, k in zip(direct, ok) if k]
    assert result["prompt_tokens"][ok].tolist() == [o.prompt_tokens for o, k in zip(direct, ok) if k]
    pd.testing.assert_frame_equal(result[df.columns], df)


def test_rows_sharing_a_prefix_run_in_the_same_partition(client, model):
    df = prompts(1)
    planned = to_dask(df, 4).llm.plan("prompt", model, npartitions=3, max_tokens=SAMPLING["max_tokens"])
    with batchllm_dask.gpu_resources():
        parts = [planned.get_partition(i).compute() for i in range(planned.npartitions)]
    rows = pd.concat(parts)
    assert sorted(rows.index) == sorted(df.index)
    assert all((p["partition"] == i).all() for i, p in enumerate(parts))
    shared = rows[rows["group"] >= 0]
    assert (shared.groupby("group")["prefix_key"].nunique() == 1).all()   # one key per instruction block
    assert (shared["prefix_key"] != 0).all() and (rows[rows["group"] < 0]["prefix_key"] == 0).all()
    # Each group is smaller than a partition here, so each group runs in exactly one partition.
    assert (shared.groupby("group")["partition"].nunique() == 1).all()
    assert shared.groupby("partition")["prompt_tokens"].size().size >= 2  # and the groups are spread out


def test_the_engine_is_loaded_once_per_worker(client, model):
    df = prompts(2)
    for npartitions in (4, 3):  # two jobs, seven partitions, one engine spec
        out = to_dask(df, 4).llm.generate("prompt", model, npartitions=npartitions, **SAMPLING, **ENGINE)
        with batchllm_dask.gpu_resources():
            out.compute()
    loads = client.run(engine_loads)
    assert len(loads) == 2 and max(loads.values()) == 1 and sum(loads.values()) >= 1


def _profiler_states(pause: bool) -> tuple[bool, bool, bool, bool]:
    """On a worker, with the pause config set to `pause`: (paused, running inside, running before, after)."""
    profile = distributed.get_worker().periodic_callbacks["profile"]
    before = profile.is_running()
    with dask.config.set({PAUSE_PROFILER: pause}), profiler_paused() as paused:
        inside = profile.is_running()
    return paused, inside, before, profile.is_running()


def test_the_worker_profiler_is_paused_while_the_engine_runs_and_resumed_after(client):
    assert client.submit(_profiler_states, True, pure=False).result() == (True, False, True, True)
    assert client.submit(_profiler_states, False, pure=False).result() == (False, True, True, True)
    with profiler_paused() as paused:  # not on a worker: nothing to pause
        assert paused is False


def test_a_profiler_that_cannot_be_paused_warns_and_generation_goes_on(monkeypatch):
    import asyncio
    import types

    import batchllm_dask.worker as worker_module
    closed = asyncio.new_event_loop()
    closed.close()
    worker = types.SimpleNamespace(loop=types.SimpleNamespace(asyncio_loop=closed))
    callback = types.SimpleNamespace(is_running=lambda: True, stop=lambda: None, start=lambda: None)
    monkeypatch.setattr(worker_module, "_worker_profiler", lambda: (worker, callback))
    with pytest.warns(RuntimeWarning, match="profiler"), profiler_paused() as paused:
        ran = True
    assert ran and paused is False


def test_bad_rows_error_and_their_neighbours_complete(client, model):
    df = prompts(3)
    out = to_dask(df, 3).llm.generate("prompt", model, npartitions=2, **SAMPLING, **ENGINE)
    with batchllm_dask.gpu_resources():
        result = out.compute().loc[df.index]
    bad = result["group"] == -2
    assert (result.loc[bad, "finish_reason"] == "error").all() and result.loc[bad, "error"].notna().all()
    assert (result.loc[~bad, "finish_reason"] != "error").all() and (result.loc[~bad, "completion_tokens"] > 0).all()
    assert len(result) == len(df)


def test_the_pandas_path_gives_the_same_frame(client, model):
    df = prompts(4)
    expected = df.llm.generate("prompt", model, **SAMPLING, **ENGINE)
    out = to_dask(df, 4).llm.generate("prompt", model, npartitions=2, **SAMPLING, **ENGINE)
    with batchllm_dask.gpu_resources():
        result = out.compute()
    # cached_tokens says which row of its batch computed a shared prefix first: it depends on the batches
    pd.testing.assert_frame_equal(result.loc[df.index].drop(columns="cached_tokens"),
                                  expected.drop(columns="cached_tokens"))


def test_default_partitions_are_one_per_gpu_worker(client, model):
    out = to_dask(prompts(), 4).llm.generate("prompt", model, **SAMPLING)
    assert out.npartitions == 2


def test_a_string_column_goes_through_the_p2p_shuffle(client, model):
    df = prompts(5)
    df = df[df["group"] >= -1].assign(prompt=lambda d: d["prompt"].astype(str))
    ddf = dd.from_pandas(df, npartitions=4)  # Dask's own string dtype: Arrow-safe, so P2P is used
    assert batchllm_dask.planning.shuffle_method(ddf._meta) is None
    assert dask.config.get("dataframe.shuffle.method", None) in (None, "p2p")
    out = ddf.llm.generate("prompt", model, npartitions=2, **SAMPLING, **ENGINE)
    with batchllm_dask.gpu_resources():
        result = out.compute()
    expected = df.llm.generate("prompt", model, **SAMPLING, **ENGINE)
    pd.testing.assert_frame_equal(result.loc[df.index].drop(columns=["prompt", "cached_tokens"]),
                                  expected.drop(columns=["prompt", "cached_tokens"]))


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cluster_kind", ["LocalCluster", "LocalCUDACluster"])
def test_gpu_cluster_matches_the_direct_engine_call(cluster_kind, tmp_path):
    """On a GPU machine: one GPU worker (a LocalCluster declaring GPU=1, or dask_cuda's LocalCUDACluster)
    runs the engine on CUDA and gives the direct engine call's completions row for row."""
    from batchllm_dask.engine.default_model import DEFAULT_MODEL_OVERRIDES, build_tiny_checkpoint
    path = str(build_tiny_checkpoint(tmp_path / "gpu-tiny", **DEFAULT_MODEL_OVERRIDES))
    engine = {"dtype": "float32", "device": "cuda", "kv_cache_bytes": 1 << 30}
    df = prompts(3)
    if cluster_kind == "LocalCluster":
        cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, resources={"GPU": 1},
                                           dashboard_address=None)
    else:
        cluster = pytest.importorskip("dask_cuda").LocalCUDACluster(n_workers=1, threads_per_worker=1,
                                                                    dashboard_address=None)
    with cluster, distributed.Client(cluster) as c:
        out = to_dask(df, 3).llm.generate("prompt", path, **SAMPLING, **engine)
        with batchllm_dask.gpu_resources():
            result = out.compute()
        assert sum(c.run(engine_loads).values()) == 1
    direct = Engine(path, **engine).generate(df["prompt"].tolist(), SamplingParams(**SAMPLING))
    result = result.loc[df.index]
    assert result["finish_reason"].tolist() == [o.finish_reason for o in direct]
    ok = (result["finish_reason"] != "error").to_numpy()
    assert ok.sum() == len(df) - 4, "only the four bad rows fail"
    assert result["completion"][ok].tolist() == [o.text for o, k in zip(direct, ok) if k]
