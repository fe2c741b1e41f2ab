"""A worker process killed while it generates costs its partition a re-run, nothing else.

A `distributed.LocalCluster` of two worker processes (each with a nanny, which
starts a new one when its worker dies).  The test waits until a worker is
executing a partition of the generate step with its engine loaded, that is,
generating, kills that process with SIGKILL, and checks that the output holds
every input row exactly once with the completions of an undisturbed greedy run
(the engine called directly).
"""
from __future__ import annotations

import os
import signal
import time

import pandas as pd
import pytest

import batchllm_dask
from batchllm_dask.engine import Engine, SamplingParams
from _helpers import to_dask

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow

ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 32 << 20}
SAMPLING = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}  # a partition of 8 rows: seconds on the CPU


def prompts() -> pd.DataFrame:
    """Token-id prompts (the planning pass then needs no tokenizer) with a shared instruction block."""
    block = [(7 * t) % 240 + 3 for t in range(40)]
    rows = [block + [(i * 13 + t) % 240 + 3 for t in range(4 + i % 5)] for i in range(16)]
    df = pd.DataFrame({"prompt": pd.Series(rows, dtype=object), "n": range(16)})
    return df.set_axis(pd.Index([f"k{i:02d}" for i in range(16)], name="key"))


@pytest.fixture(scope="module")
def model(tiny_llama_dir) -> str:
    return str(tiny_llama_dir)


@pytest.fixture(scope="module")
def direct(model) -> list:
    return Engine(model, **ENGINE).generate(prompts()["prompt"].tolist(), SamplingParams(**SAMPLING))


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, resources={"GPU": 1},
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as c:
        yield c


def _generating(dask_worker) -> bool:
    """On a worker: is it executing a partition of the generate step, with its engine loaded?"""
    from batchllm_dask import caches
    executing = [str(ts.key) for ts in dask_worker.state.executing]
    return caches._engine is not None and any("run_partition" in k for k in executing)


def kill_a_generating_worker(client, timeout: float = 60.0) -> int:
    """SIGKILL the process of the first worker seen generating; returns its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            busy = [addr for addr, yes in client.run(_generating).items() if yes]
        except Exception:  # noqa: BLE001 - a worker starting or stopping: ask again
            busy = []
        if busy:
            pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.05)
    raise AssertionError("no worker was seen generating")


@pytest.mark.parametrize("checkpointed", [False, True])
def test_a_worker_killed_while_generating_costs_a_rerun_and_no_row(client, model, direct, tmp_path, checkpointed):
    df = prompts()
    extra = {"checkpoint": str(tmp_path / "ckpt")} if checkpointed else {}
    out = to_dask(df, 2).llm.generate("prompt", model, npartitions=2, **extra, **SAMPLING, **ENGINE)
    assert out.npartitions == 2
    pids_before = set(client.run(os.getpid).values())
    with batchllm_dask.gpu_resources():
        future = client.compute(out)
    killed = kill_a_generating_worker(client)
    result = future.result(timeout=300)
    assert killed in pids_before and killed not in client.run(os.getpid).values()  # it really died
    assert len(result) == len(df) and result.index.is_unique and sorted(result.index) == sorted(df.index)
    result = result.loc[df.index]
    assert (result["finish_reason"] == "length").all()
    assert result["completion"].tolist() == [o.text for o in direct]
    assert result["completion_tokens"].tolist() == [o.completion_tokens for o in direct]
    pd.testing.assert_frame_equal(result[df.columns], df, check_dtype=False, check_index_type=False)  # Dask's str
    if checkpointed:
        finished = pd.read_parquet(tmp_path / "ckpt")
        assert len(finished) == len(df) and finished.index.is_unique  # the re-run replaced, never duplicated
