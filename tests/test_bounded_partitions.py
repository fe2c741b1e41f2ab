"""Bounded partitions: a job's cost decides how many partitions it has, never fewer than asked for.

`partition_tokens` bounds one output partition's estimated cost (prompt tokens
after sharing plus max_tokens per row).  Token-id prompts need no tokenizer, so
the planner's tests run in milliseconds; the accessor's run the tiny model.
"""
from __future__ import annotations

import dask
import numpy as np
import pandas as pd
import pytest

import batchllm_dask  # noqa: F401 - registers .llm
from batchllm_dask import cli, planning as P
from batchllm_dask.engine import Engine, SamplingParams
from _helpers import to_dask

ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 32 << 20}
SAMPLING = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}


def id_rows(groups: int = 3, size: int = 6, prefix_len: int = 64, unshared: int = 6, seed: int = 0) -> pd.DataFrame:
    """Token-id prompts: `groups` blocks of `prefix_len` shared tokens with short suffixes, and unshared rows."""
    rng = np.random.default_rng(seed)
    prompts, group = [], []
    for g in range(groups):
        prefix = rng.integers(3, 250, prefix_len).tolist()
        for _ in range(size):
            prompts.append(prefix + rng.integers(3, 250, int(rng.integers(4, 12))).tolist())
            group.append(g)
    for _ in range(unshared):
        prompts.append(rng.integers(3, 250, int(rng.integers(20, 40))).tolist())
        group.append(-1)
    df = pd.DataFrame({"prompt": pd.Series(prompts, dtype=object), "group": group})
    df.index = pd.Index(np.arange(len(df)) * 3 + 1, name="rid")
    return df.sample(frac=1.0, random_state=seed)


def job_cost(df: pd.DataFrame, max_tokens: int) -> float:
    """The plan's total cost of a job in one partition (each shared prefix once)."""
    tok = P.tokenize_partition(df, "prompt", "no-model-needed", False)
    plan = P.build_plan(P.partition_stats(tok, 16), 1, max_tokens, 16)
    return plan.partition_cost


@pytest.fixture(scope="module")
def model(tiny_llama_dir) -> str:
    return str(tiny_llama_dir)


def test_partition_count_is_the_larger_of_the_workers_and_the_cost_bound():
    assert P.partition_count(1000.0, 2, None) == 2          # no bound: as many as asked
    assert P.partition_count(1000.0, 2, 300) == 4           # ceil(1000 / 300)
    assert P.partition_count(100.0, 3, 300) == 3            # never fewer than the workers


def test_a_job_costlier_than_the_bound_gets_more_partitions_and_groups_that_fit_stay_whole():
    df = id_rows(groups=4, size=8, unshared=10)
    total = job_cost(df, 16)
    tok = P.tokenize_partition(df, "prompt", "no-model-needed", False)
    bound = int(total / 3.5)
    plan = P.build_plan(P.partition_stats(tok, 16), 1, 16, 16, partition_tokens=bound)
    assert plan.npartitions == 4 and plan.partition_cost <= bound
    planned = P.assign_partitions(tok, plan)
    shared = planned[planned[P.KEY] != 0]
    assert shared[P.KEY].nunique() == 4 and (shared.groupby(P.KEY)[P.TARGET].nunique() == 1).all()
    assert set(planned[P.TARGET]) == set(range(4))


def test_dask_without_a_cluster_splits_a_costly_job_even_when_one_partition_is_asked(model):
    df = id_rows()
    total = job_cost(df, SAMPLING["max_tokens"])
    bound = int(total / 2.5)                               # three partitions' worth
    ddf = to_dask(df, 1)
    with dask.config.set(scheduler="sync"):
        out = ddf.llm.generate("prompt", model, npartitions=1, partition_tokens=bound, **SAMPLING, **ENGINE)
        assert out.npartitions == 3                        # known when the job is built: the plan was computed
        planned = ddf.llm.plan("prompt", model, max_tokens=SAMPLING["max_tokens"], npartitions=1,
                               partition_tokens=bound).compute()
        result = out.compute()
    groups = planned[planned["group"] >= 0].groupby("group")["partition"].nunique()
    assert (groups == 1).all()                             # each prefix group fits, and stays whole
    assert sorted(planned["partition"].unique()) == [0, 1, 2]
    direct = Engine(model, **ENGINE).generate(df["prompt"].tolist(), SamplingParams(**SAMPLING))
    assert len(result) == len(df) and result.index.is_unique
    result = result.loc[df.index]
    assert result["completion"].tolist() == [o.text for o in direct]
    assert result["completion_tokens"].tolist() == [o.completion_tokens for o in direct]


def test_a_job_within_the_bound_is_one_task_in_the_input_order(model):
    df = id_rows(groups=1, size=3, unshared=2)
    ddf = to_dask(df, 2)
    out = ddf.llm.generate("prompt", model, npartitions=1, partition_tokens=10 ** 6, **SAMPLING, **ENGINE)
    assert out.npartitions == 1
    assert any("generate_partition" in str(k) for k in dict(out.__dask_graph__()))
    result = out.compute(scheduler="sync")
    assert list(result.index) == list(ddf.index.compute())


def test_bad_partition_tokens_is_a_value_error_naming_it(model):
    ddf = to_dask(id_rows(groups=1, size=2, unshared=1), 1)
    for bad in (0, -5, 2.5, "many", True):
        with pytest.raises(ValueError, match="partition_tokens"):
            ddf.llm.generate("prompt", model, partition_tokens=bad, **SAMPLING)


def test_the_command_line_plan_takes_partition_tokens(model, tmp_path, capsys):
    df = pd.DataFrame({"prompt": [f"Question {i}: " + "tell me more " * 6 for i in range(12)]})
    df.to_parquet(tmp_path / "in.parquet")
    argv = ["plan", str(tmp_path / "in.parquet"), "--model", model, "--npartitions", "1", "--max-tokens", "8"]
    assert cli.main([*argv, "--partition-tokens", "none"]) == 0
    assert "partitions             1 " in capsys.readouterr().out
    assert cli.main([*argv, "--partition-tokens", "200"]) == 0
    planned = int(capsys.readouterr().out.split("partitions")[1].split()[0])
    assert planned > 1
    assert cli.main([*argv, "--partition-tokens", "0"]) == 2
    assert "--partition-tokens: must be an integer >= 1" in capsys.readouterr().err
