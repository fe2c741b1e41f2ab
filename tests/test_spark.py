"""The Spark path end to end on a local Spark session (local[2]: two Python workers), real engine on a tiny model.

One session for the module; every generate call uses the same engine options, so each Python worker
builds one engine whatever the test order.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import dask.dataframe as dd
import pandas as pd
import pytest

pyspark = pytest.importorskip("pyspark")
from pyspark.sql import SparkSession, functions as F, types as T  # noqa: E402

import batchllm_dask  # noqa: E402,F401 - registers .llm
from batchllm_dask import spark as bspark  # noqa: E402
from batchllm_dask.engine import Engine, SamplingParams  # noqa: E402

ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 32 << 20}
GREEDY = {"max_tokens": 4, "temperature": 0.0, "ignore_eos": True}
ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]  # pyspark's own, under pandas 3


@pytest.fixture(scope="module")
def spark():
    os.environ["PYSPARK_PYTHON"] = sys.executable  # the workers run this interpreter (and inherit TRITON_INTERPRET)
    session = (SparkSession.builder.master("local[2]").appName("batchllm-dask-tests")
               .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "2").config("spark.driver.host", "127.0.0.1")
               .getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def model(tiny_llama_dir) -> str:
    return str(tiny_llama_dir)


def prompts() -> pd.DataFrame:
    """Two instruction blocks (8 and 4 rows), unshared rows, then bad rows: null, empty, too long."""
    rows: list[object] = []
    for b, size in enumerate([8, 4]):
        block = f"Task {b}: read the product review and answer positive or negative, with one reason. " * 2
        rows += [block + f"Review {b}.{i}: " + "fine " * (i % 3 + 1) for i in range(size)]
    rows += [f"{i} unrelated question number {i}?" for i in range(3)]
    rows += [None, "", "z" * 2100]
    return pd.DataFrame({"id": range(100, 100 + len(rows)), "prompt": pd.Series(rows, dtype=object)})


def to_spark(spark, df: pd.DataFrame, partitions: int = 3):
    schema = T.StructType([T.StructField("id", T.LongType()), T.StructField("prompt", T.StringType())])
    return spark.createDataFrame(df, schema).repartition(partitions)


@pytest.fixture(scope="module")
def greedy_results(spark, model):
    """(input, Spark result, Dask result, direct engine outputs, the result DataFrame, tasks, Python workers'
    reports before and after), computed once: the Spark job is the module's first to generate."""
    df = prompts()
    before = worker_reports(spark)
    out = bspark.generate(to_spark(spark, df), "prompt", model, npartitions=3, **GREEDY, **ENGINE)
    got = out.withColumn("_task", F.spark_partition_id()).toPandas().set_index("id").loc[df["id"]]
    after = worker_reports(spark)
    ddf = dd.from_pandas(df.set_index("id"), npartitions=2)
    on_dask = ddf.llm.generate("prompt", model, npartitions=2, **GREEDY, **ENGINE).compute().loc[df["id"]]
    direct = Engine(model, **ENGINE).generate(df["prompt"].tolist(), SamplingParams(**GREEDY))
    return df.set_index("id"), got.drop(columns="_task"), on_dask, direct, out, got["_task"], before, after


def worker_reports(spark) -> pd.DataFrame:
    """`worker_report()` of the idle Python workers, by pid: one task per slot, long enough that both run at once."""
    def report(_batches):  # nested: cloudpickle sends it by value (the workers cannot import this test module)
        time.sleep(1.0)
        yield pd.DataFrame([bspark.worker_report()])
    schema = T.StructType([T.StructField(c, T.LongType()) for c in ("pid", "engine_loads", "partitions_run")])
    reports = spark.range(0, 2, numPartitions=2).mapInPandas(report, schema).toPandas()
    return reports.drop_duplicates("pid").set_index("pid")


def test_completions_match_the_dask_path_and_the_direct_engine_row_for_row(greedy_results):
    df, got, on_dask, direct = greedy_results[:4]
    assert len(got) == len(df) and got.index.is_unique  # rows in, equal rows out
    assert got["prompt"].fillna("<null>").tolist() == df["prompt"].fillna("<null>").tolist()
    ok = got["finish_reason"] != "error"
    assert ok.sum() == len(df) - 3
    for col in ("completion", "prompt_tokens", "completion_tokens", "finish_reason"):
        assert got.loc[ok, col].tolist() == on_dask.loc[ok, col].tolist(), col
    assert got.loc[ok, "completion"].tolist() == [o.text for o, k in zip(direct, ok) if k]
    assert (got.loc[ok, "completion_tokens"] == GREEDY["max_tokens"]).all()


def test_rows_sharing_a_prefix_run_in_one_spark_partition(spark, model, greedy_results):
    df = prompts()
    view = bspark.plan(to_spark(spark, df), "prompt", model, npartitions=3, max_tokens=4)
    planned = view.withColumn("task", F.spark_partition_id()).toPandas()
    assert sorted(planned["id"]) == sorted(df["id"]) and (planned["task"] == planned["partition"]).all()
    shared = planned[planned["prefix_key"] != 0]
    assert shared["prefix_key"].nunique() == 2 and len(shared) == 12
    assert (shared.groupby("prefix_key")["task"].nunique() == 1).all()
    # and the engine shared each block inside its task: every row of a group but the first read it from cache
    got = greedy_results[1].loc[shared["id"]]
    read_block = got["cached_tokens"].to_numpy() >= shared["prefix_len"].to_numpy()
    assert sorted(pd.Series(read_block).groupby(shared["prefix_key"].to_numpy()).sum().tolist()) == [3, 7]


def test_a_group_larger_than_a_partition_is_split_and_partitions_balanced(spark, model):
    block = "Shared instructions for every single row of this large group, to be read once. " * 3
    df = pd.DataFrame({"id": range(40), "prompt": [block + f"Row {i} " + "word " * (i % 5) for i in range(40)]})
    planned = bspark.plan(to_spark(spark, df, 2), "prompt", model, npartitions=3, max_tokens=8).toPandas()
    assert planned["prefix_key"].nunique() == 1 and planned["partition"].nunique() == 3
    costs = (planned["prompt_tokens"] - planned["prefix_len"] + 8).groupby(planned["partition"]).sum()
    assert costs.max() - costs.min() <= 2 * costs.mean() / 3  # within a group-cut of each other, not all in one


def test_bad_rows_carry_the_error_as_on_dask(greedy_results):
    df, got, on_dask = greedy_results[:3]
    bad = df["prompt"].isna() | (df["prompt"] == "") | (df["prompt"].str.len() > 2000)
    assert (got.loc[bad, "finish_reason"] == "error").all() and got.loc[bad, "completion"].isna().all()
    assert got.loc[bad, "error"].tolist() == on_dask.loc[bad, "error"].tolist()
    assert got.loc[~bad, "error"].isna().all()


def test_a_non_text_prompt_column_gives_every_row_the_dask_error(spark, model):
    df = pd.DataFrame({"id": [1, 2], "prompt": [7, 8]})
    got = bspark.generate(spark.createDataFrame(df), "prompt", model, npartitions=1, **GREEDY, **ENGINE).toPandas()
    expected = df.llm.generate("prompt", model, **GREEDY, **ENGINE)
    assert got.sort_values("id")["error"].tolist() == expected["error"].tolist()
    assert (got["finish_reason"] == "error").all()


def test_the_schema_is_explicit_and_matches_the_columns(greedy_results):
    got, out = greedy_results[1], greedy_results[4]
    types = {f.name: type(f.dataType).__name__ for f in out.schema.fields}
    assert types == {"id": "LongType", "prompt": "StringType", "completion": "StringType",
                     "prompt_tokens": "LongType", "completion_tokens": "LongType", "cached_tokens": "LongType",
                     "finish_reason": "StringType", "error": "StringType"}
    assert out.columns == ["id", "prompt", *batchllm_dask.worker.result_meta(pd.DataFrame(), "completion").columns]
    assert list(got.reset_index().columns) == out.columns


def test_json_schema_fields_are_typed_spark_columns(spark, model):
    schema = {"type": "object", "properties": {"rating": {"type": "integer"}, "tags": {"type": "array"}},
              "required": ["rating", "tags"]}
    df = pd.DataFrame({"id": [1], "prompt": ["Rate this review as JSON: great kettle."]})
    out = bspark.generate(to_spark(spark, df, 1), "prompt", model, npartitions=1, json_schema=schema,
                          max_tokens=3, **ENGINE)
    assert [(f.name, type(f.dataType).__name__) for f in out.schema.fields][-2:] == [("rating", "LongType"),
                                                                                     ("tags", "StringType")]
    row = out.toPandas().iloc[0]  # 3 tokens cannot finish the object: the reason is in error, the fields null
    assert "not complete JSON" in row["error"] and pd.isna(row["rating"]) and pd.isna(row["tags"])


def test_sampled_rows_are_reproducible_by_seed_whatever_the_partitioning(spark, model):
    df = prompts().iloc[[0, 1, 2, 8, 9, 12, 13]]
    sampling = {"max_tokens": 3, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    runs = {}
    for n, key_col in [(1, "id"), (3, "id"), (1, None), (3, None)]:
        out = bspark.generate(to_spark(spark, df, n + 1), "prompt", model, npartitions=n, key_col=key_col,
                              **sampling, **ENGINE)
        runs[n, key_col] = out.toPandas().set_index("id").loc[df["id"], "completion"].tolist()
    assert runs[1, "id"] == runs[3, "id"] and runs[1, None] == runs[3, None]
    assert runs[1, "id"] != runs[1, None]  # the seed follows the key: another key, other samples


def test_bad_options_raise_on_the_driver_before_any_job(spark, model):
    sdf = to_spark(spark, prompts())
    sc = spark.sparkContext
    sc.setJobGroup("bad-options", "generate() calls that must fail on the driver")
    try:
        with pytest.raises(ValueError, match="temperature"):
            bspark.generate(sdf, "prompt", model, temperature=-1.0)
        with pytest.raises(TypeError, match="temprature"):
            bspark.generate(sdf, "prompt", model, temprature=0.0)
        with pytest.raises(ValueError, match="page_size"):
            bspark.generate(sdf, "prompt", model, page_size=0)
        with pytest.raises(KeyError, match="'text' not found"):
            bspark.generate(sdf, "text", model)
        with pytest.raises(KeyError, match="'row_id' not found"):
            bspark.generate(sdf, "prompt", model, key_col="row_id")
        with pytest.raises(ValueError, match="npartitions"):
            bspark.generate(sdf, "prompt", model, npartitions=0)
        with pytest.raises(TypeError, match="checkpoint: not supported by the Spark path"):
            bspark.generate(sdf, "prompt", model, checkpoint="ckpt/")
        with pytest.raises(TypeError, match="Spark DataFrame"):
            bspark.generate(prompts(), "prompt", model)
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    assert list(sc.statusTracker().getJobIdsForGroup("bad-options")) == []


def test_example_script_labels_every_review(spark, tiny_llama_dir, tmp_path, capsys):
    path = ROOT / "examples" / "spark_reviews.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    answers_path = example.main(["--model", str(tiny_llama_dir), "--rows", "16", "--max-tokens", "3",
                                 "--npartitions", "2", "--workdir", str(tmp_path)])
    reviews = pd.read_parquet(tmp_path / "reviews.parquet").reset_index()
    answers = pd.read_parquet(answers_path).sort_values("review_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(answers[reviews.columns], reviews, check_dtype=False)
    assert (answers["finish_reason"] != "error").all() and (answers["completion_tokens"] > 0).all()
    assert "prompt" not in answers.columns and "16 reviews labelled" in capsys.readouterr().out
    assert spark.sparkContext._jsc is not None  # the example used the running session and left it running


def test_the_engine_is_loaded_once_per_python_worker_and_reused(spark, greedy_results):
    assert spark.sparkContext.getConf().get("spark.python.worker.reuse", "true") == "true"
    tasks, before, after = greedy_results[5:]
    assert tasks.nunique() == 3  # each planned partition is one task, 3 of them on 2 task slots
    delta = after - before.reindex(after.index, fill_value=0)
    ran = delta["partitions_run"] > 0
    assert delta.loc[ran, "partitions_run"].sum() == 3  # the probe reached every worker that ran one
    assert (delta.loc[ran, "engine_loads"] == 1).all()  # each built the engine once, for its first partition
    assert (delta.loc[~ran, "engine_loads"] == 0).all()
    assert ran.sum() < 3  # fewer workers than partitions: a worker ran several on its one engine
