"""The PySpark function: every row's completion of a Spark DataFrame, on the same planner and engine as Dask.

    from batchllm_dask.spark import generate
    out = generate(sdf, "prompt", model="/models/llama", max_tokens=64)   # a Spark DataFrame
    out.write.parquet("answers/")

The pipeline is the Dask one (planning.py), with Spark's operators in Dask's place:

1. prefix statistics: each Arrow batch of each Spark partition is tokenized
   (`planning.tokenize_partition`, the tokenizer cached per Python worker) and counted
   (`planning.partition_stats`) in one `mapInPandas`; Spark's `groupBy().agg()` sums the counts per
   (input partition, prefix hash) and they are collected to the driver (small: one row per prefix hash
   per input partition), where the same `planning.build_plan` turns them into the `PrefixPlan`.  This
   statistics job runs when `generate` is called; generation runs when the result is written or
   collected, and reads the input again (persist `sdf` first where reading it is costly);
2. each input partition, whole, is tokenized again and `planning.assign_partitions` gives each row
   its prefix key and target partition (one `mapInPandas`: a group's running cost offsets are those
   the plan counted); the token ids travel with their row as a binary column;
3. `repartition(n, ROUTE)`, where ROUTE is an exact mapping: for every target t the driver picks a
   value r_t whose Spark hash lands in partition t (`exact_routes`, computed by Spark's own `hash`
   and `pmod`, the expression of its hash partitioning), so target t is Spark partition t, one task
   each, the cost balance of the plan kept.  Plain `repartition(n, TARGET)` hashes several targets
   into one task and leaves others empty; `repartitionByRange` picks its bounds from a sample; a
   `groupBy(TARGET).applyInPandas` would call once per group but hash several groups into one task
   too.  A user-numbered repartition is also the one shuffle adaptive execution does not coalesce;
4. `mapInPandas` of the partition runner: one `worker.generate_rows` call, that is one
   `Engine.generate`, per target partition, on the engine cached by the Python worker
   (`caches.get_engine`: loaded by the worker's first partition, reused by every later one; Spark
   reuses Python workers, `spark.python.worker.reuse`, by default).  The runner groups its rows by
   target, so a prefix group never runs split even if the hash mapping ever changed: only the
   balance depends on `exact_routes`.

Every stage runs a single Python function per task: Spark starts one Python worker for each
`mapInPandas` of a stage, side by side, so chained ones would multiply the workers (each with its
tokenizer, and perhaps an engine).  An executor thus holds one Python worker per task it runs at
once: with one task per GPU (below), one worker and one engine per GPU.  Spark owns the workers'
lifetimes: it stops those idle for a minute and may fork a fresh one for a task while another is
idle; a new worker loads the engine once more (`spark.python.factory.idleWorkerMaxPoolSize=1` keeps
one idle worker, and so one engine, per task slot).

Output: the input's columns plus the completion columns of the Dask path (`worker.result_meta`),
under an explicit Spark schema (`result_schema`): `completion` and `finish_reason` and `error`
strings, the token counts longs, and with `json_schema=` the schema's fields (integer -> long,
number -> double, boolean -> boolean, string -> string; arrays, objects and mixed types as their JSON
text, since a Spark column needs one type).  Rows in equal rows out, in no particular order.

Sampled rows are seeded per row (`row_sampling.py`): Spark has no index, so the key is the value of
`key_col` when given (a column that identifies rows, e.g. an id), else the prompt's token ids; a
row's completion then does not depend on how the job was partitioned.  Without `key_col`, rows with
the same prompt get the same seed, and so the same sampled completion.

GPUs: ask Spark for one GPU per task, so that one task, one Python worker and one engine run per GPU:
    --conf spark.executor.resource.gpu.amount=1 --conf spark.task.resource.gpu.amount=1
    --conf spark.executor.resource.gpu.discoveryScript=/opt/spark/examples/src/main/scripts/getGpusResources.sh
    --conf spark.executor.cores=8 --conf spark.task.cpus=8   (the tokenizer and the engine's host loop)
    generate(..., device="cuda", npartitions=<GPUs>)      (else `default_npartitions` from these settings)
Spark then runs one task at a time per GPU in every stage (the tokenizing ones are short beside
generation).  The engine takes the device torch sees: with several GPUs per executor, give each
executor one GPU, or pin `device=` per task (`TaskContext.get().resources()["gpu"]`).
`resource_profile=` (a `pyspark.resource.ResourceProfile` built with `TaskResourceRequests().resource("gpu", 1)`)
puts the GPU request on the generation stage alone, through stage-level scheduling (YARN, Kubernetes,
standalone; with dynamic allocation it runs on executors of that profile, whose Python workers serve
only generation), leaving tokenizing and statistics on CPU slots.

Checkpoint and resume: not a `checkpoint=` option as on Dask (issue 11, `checkpoint.py`); Spark's own
mechanisms serve.  A failed task is re-run by Spark alone (`spark.task.maxFailures`) from its shuffle
input, so a lost executor costs only its partitions.  A job stopped as a whole publishes nothing (the
output committer moves the task files at job end), so a long job runs in slices, each written by its
own job, and resumes by an anti-join of the input against the rows written:
    for k in range(8):   # each slice is planned on its own: keep slices large
        rows = sdf.where(F.pmod(F.hash("id"), 8) == k)
        generate(rows, "prompt", model=M, key_col="id").write.mode("append").parquet("answers/")
    done = spark.read.parquet("answers/").select("id")                  # after a stop
    generate(sdf.join(done, "id", "left_anti"), "prompt", model=M, key_col="id").write.mode("append")...
(`key_col` keeps sampled rows what they would have been.)  `generate(..., checkpoint=...)` raises TypeError.
"""
from __future__ import annotations

import json
import os
from functools import partial
from typing import Any, Iterator

import pandas as pd

try:
    from pyspark import TaskContext
    from pyspark.sql import DataFrame, SparkSession
    from pyspark.sql import functions as F
    from pyspark.sql import types as T
except ImportError as exc:  # pragma: no cover - the optional extra
    raise ImportError("batchllm_dask.spark needs pyspark: pip install 'batchllm-dask[spark]'") from exc

from .accessor import _check_args, _check_column, split_options
from .caches import EngineSpec, engine_loads
from .json_columns import check_field_names
from .planning import (DEFAULT_PARTITION_TOKENS, ERROR, INDEX_PREFIX, KEY, KEY_LEN, TARGET, TOKENS, PrefixPlan,
                       assign_partitions, build_plan, partition_stats, token_arrays, token_counts, tokenize_partition)
from .worker import generate_rows, result_meta

ROUTE = "_bl_route"  # the value whose Spark hash puts a row's target partition t in Spark partition t
_TOKENIZED = [T.StructField(TOKENS, T.BinaryType()), T.StructField(ERROR, T.StringType())]
_KEYED = [T.StructField(c, T.LongType()) for c in (KEY, KEY_LEN, TARGET, ROUTE)]
_STATS = T.StructType([T.StructField(c, T.LongType()) for c in ("part", "hash", "parent", "length", "count", "tokens")])
_PLAN_VIEW = [T.StructField("prompt_tokens", T.LongType()), T.StructField("prefix_key", T.LongType()),
              T.StructField("prefix_len", T.LongType()), T.StructField("partition", T.LongType()),
              T.StructField("error", T.StringType())]


# ----------------------------------------------------------------------------- public API

def generate(sdf: DataFrame, prompt_col: str, model: str, *, output_col: str = "completion", chat: bool = False,
             npartitions: int | None = None, key_col: str | None = None,
             partition_tokens: int | None = DEFAULT_PARTITION_TOKENS, resource_profile: Any = None,
             checkpoint: Any = None, **options: Any) -> DataFrame:
    """Every row's completion of `sdf[prompt_col]`: a Spark DataFrame (see the module docstring).

    prompt_col: text or token ids (an array of integers).
    model, chat, output_col, options: as `batchllm_dask.generate` (sampling and engine options,
        validated here on the driver: ValueError or TypeError naming the option before any job runs).
    npartitions: the fewest output partitions (default `default_npartitions`, one per GPU task slot);
        the plan makes more where one would cost more than `partition_tokens` (None: no bound).
    key_col: a column identifying rows, the key of a sampled row's seed; default the prompt's token ids.
    resource_profile: a `pyspark.resource.ResourceProfile` for the generation stage only.
    checkpoint: not supported on Spark (TypeError); see the module docstring for Spark's own way.

    Runs the prefix-statistics job now; the generation runs when the result is written or collected.
    """
    if checkpoint is not None:
        raise TypeError("checkpoint: not supported by the Spark path; Spark re-runs failed tasks itself, "
                        "a long job runs in slices, each its own write, and resumes with a left_anti join of the "
                        "input against the rows written (recipe: the batchllm_dask.spark docstring, README ## Spark)")
    sampling, spec = _check(sdf, prompt_col, model, output_col, chat, npartitions, key_col, options)
    if sampling.json_schema is not None:
        check_field_names(sampling.json_schema, [*sdf.columns, *result_meta(pd.DataFrame(), output_col).columns])
    planned = _planned(sdf, prompt_col, spec.model, chat, sampling.max_tokens, npartitions, partition_tokens)
    schema = result_schema(sdf.schema, output_col, sampling)
    run = partial(_generate_batches, columns=sdf.columns, spec=spec, sampling=sampling, output_col=output_col,
                  key_col=key_col, schema=schema)
    if resource_profile is not None:
        return planned.mapInPandas(run, schema, profile=resource_profile)
    return planned.mapInPandas(run, schema)


def plan(sdf: DataFrame, prompt_col: str, model: str, *, chat: bool = False, max_tokens: int = 16,
         npartitions: int | None = None, partition_tokens: int | None = DEFAULT_PARTITION_TOKENS) -> DataFrame:
    """The partitions `generate` would run: the input plus prompt_tokens, prefix_key, prefix_len, partition, error.

    Each row sits in the Spark partition it would generate in (`F.spark_partition_id() == partition`).
    Rows of one shared prefix (same `prefix_key`, 0 for a row that shares nothing) are in one partition
    unless their group is larger than a partition.  No weights are loaded.
    """
    _check(sdf, prompt_col, model, "x", chat, npartitions, None, {"max_tokens": max_tokens})
    planned = _planned(sdf, prompt_col, EngineSpec.make(str(model), {}).model, chat, max_tokens, npartitions,
                       partition_tokens)
    names = [c for c in sdf.columns if c not in {f.name for f in _PLAN_VIEW}]
    schema = T.StructType([sdf.schema[c] for c in names] + _PLAN_VIEW)
    return planned.mapInPandas(partial(_plan_batches, columns=names), schema)


def default_npartitions(spark: SparkSession) -> int:
    """One output partition per GPU task slot when Spark's GPU resources are configured, else per core.

    GPU slots: spark.executor.instances x (spark.executor.resource.gpu.amount // spark.task.resource.gpu.amount);
    cores: the SparkContext's default parallelism.  Pass `npartitions=` where neither is known (dynamic allocation).
    """
    def conf(key: str) -> float:
        try:
            return float(spark.conf.get(key, "0") or 0)
        except (ValueError, TypeError):
            return 0.0
    executors, exec_gpus, task_gpus = (conf(f"spark.{k}") for k in ("executor.instances",
                                       "executor.resource.gpu.amount", "task.resource.gpu.amount"))
    if executors and exec_gpus and task_gpus:
        return max(1, int(executors) * int(exec_gpus // task_gpus))
    try:
        return max(1, spark.sparkContext.defaultParallelism)
    except Exception:  # noqa: BLE001 - Spark Connect has no SparkContext
        return max(1, int(conf("spark.default.parallelism")) or 1)


def result_schema(input_schema: T.StructType, output_col: str = "completion", sampling: Any = None) -> T.StructType:
    """The output's Spark schema: the input's fields, then the completion columns typed from `worker.result_meta`.

    Columns are placed as `DataFrame.assign` places them: a completion column named like an input column
    takes its place.
    """
    added = result_meta(pd.DataFrame(), output_col, sampling).dtypes
    meta = result_meta(pd.DataFrame({c: [] for c in input_schema.names}), output_col, sampling)
    return T.StructType([T.StructField(c, _spark_type(added[c])) if c in added.index else input_schema[c]
                         for c in meta.columns])


def worker_report() -> dict[str, int]:
    """This Python worker's pid, engines built and target partitions run (call it inside a Spark task)."""
    return {"pid": os.getpid(), "engine_loads": engine_loads(), "partitions_run": _partitions_run}


# ----------------------------------------------------------------------------- driver side

def _check(sdf: Any, prompt_col: str, model: str, output_col: str, chat: bool, npartitions: Any,
           key_col: Any, options: dict[str, Any]) -> tuple[Any, EngineSpec]:
    """Everything checkable on the driver, before a job runs: (SamplingParams, EngineSpec)."""
    if not isinstance(sdf, DataFrame):
        raise TypeError(f"generate() takes a Spark DataFrame, got {type(sdf).__name__}")
    _check_args(output_col, chat, npartitions)
    _check_column(sdf.columns, prompt_col)
    if key_col is not None:
        _check_column(sdf.columns, key_col)
    sampling, engine_options = split_options(options)
    return sampling, EngineSpec.make(str(model), engine_options)


def _planned(sdf: DataFrame, prompt_col: str, model: str, chat: bool, max_tokens: int, npartitions: int | None,
             partition_tokens: int | None, block: int = 16) -> DataFrame:
    """`sdf` tokenized, keyed and repartitioned: Spark partition t holds the rows of target partition t."""
    n = npartitions or default_npartitions(sdf.sparkSession)
    prefix_plan = plan_prefixes(sdf, prompt_col, model, chat, n, max_tokens, block, partition_tokens)
    routes = exact_routes(sdf.sparkSession, prefix_plan.npartitions)
    keyed = sdf.mapInPandas(partial(_assign_batches, prompt_col=prompt_col, model=model, chat=chat,
                                    plan=prefix_plan, routes=routes),
                            T.StructType(sdf.schema.fields + _TOKENIZED + _KEYED))
    return keyed.repartition(prefix_plan.npartitions, ROUTE)


def plan_prefixes(sdf: DataFrame, prompt_col: str, model: str, chat: bool, npartitions: int, max_tokens: int,
                  block: int = 16, partition_tokens: int | None = DEFAULT_PARTITION_TOKENS) -> PrefixPlan:
    """The `PrefixPlan` of `sdf`: per-batch prefix counts, summed by Spark, planned on the driver."""
    stats = sdf.mapInPandas(partial(_stats_batches, prompt_col=prompt_col, model=model, chat=chat, block=block),
                            _STATS)
    table = (stats.groupBy("part", "hash")
             .agg(F.first("parent").alias("parent"), F.first("length").alias("length"),
                  F.sum("count").alias("count"), F.sum("tokens").alias("tokens"))
             .toPandas())
    if table.empty:  # no rows at all: one empty partition
        table = pd.DataFrame([[0] * len(_STATS.names)], columns=_STATS.names)
    return build_plan(table[_STATS.names], npartitions, max_tokens, block, partition_tokens=partition_tokens)


def exact_routes(spark: SparkSession, n: int) -> list[int]:
    """routes[t]: a long whose `pmod(hash(value), n)` is t, Spark's hash partitioning of `repartition(n, col)`.

    Asked of Spark itself (a small job, remembered per session and n), not reimplemented here.
    """
    known = _routes.get((id(spark), n))
    if known is None:
        known = _routes[id(spark), n] = _find_routes(spark, n)
    return known


_routes: dict[tuple[int, int], list[int]] = {}


def _find_routes(spark: SparkSession, n: int) -> list[int]:
    span = 64 * n
    while True:
        found = (spark.range(0, span).select(F.expr(f"pmod(hash(id), {n})").alias("t"), "id")
                 .groupBy("t").agg(F.min("id").alias("id")).collect())
        routes = {int(r["t"]): int(r["id"]) for r in found}
        if len(routes) == n:
            return [routes[t] for t in range(n)]
        span *= 4


# ----------------------------------------------------------------------------- in the Python workers

_partitions_run = 0  # target partitions this Python worker generated (worker_report)


def _partition_number() -> int:
    ctx = TaskContext.get()
    return ctx.partitionId() if ctx is not None else 0


def _whole_partition(batches: Iterator[pd.DataFrame]) -> pd.DataFrame | None:
    """The Arrow batches of this task as one frame (None when it has none)."""
    frames = list(batches)
    return pd.concat(frames, ignore_index=True) if frames else None


def _stats_batches(batches: Iterator[pd.DataFrame], prompt_col: str, model: str, chat: bool,
                   block: int) -> Iterator[pd.DataFrame]:
    """Tokenize and count prefixes in one Python function: one Python worker per task (module docstring)."""
    info = {"number": _partition_number()}
    for batch in batches:
        yield partition_stats(tokenize_partition(batch, prompt_col, model, chat), block, info)


def _assign_batches(batches: Iterator[pd.DataFrame], prompt_col: str, model: str, chat: bool, plan: PrefixPlan,
                    routes: list[int]) -> Iterator[pd.DataFrame]:
    """Token ids, keys and targets of the whole input partition at once: a group's cost offsets run across
    its batches, as the plan counted them."""
    part = _whole_partition(batches)
    if part is None:
        return
    out = assign_partitions(tokenize_partition(part, prompt_col, model, chat), plan, {"number": _partition_number()})
    out = out.drop(columns=[c for c in out.columns if c.startswith(INDEX_PREFIX)])
    yield out.assign(**{TOKENS: pd.Series(out[TOKENS].tolist(), index=out.index, dtype=object),  # Spark binary
                        ROUTE: out[TARGET].map(dict(enumerate(routes))).astype("int64")})


def _generate_batches(batches: Iterator[pd.DataFrame], columns: list[str], spec: EngineSpec, sampling: Any,
                      output_col: str, key_col: str | None, schema: T.StructType) -> Iterator[pd.DataFrame]:
    """One `generate_rows` call per target partition of this task (normally exactly one)."""
    global _partitions_run
    part = _whole_partition(batches)
    if part is None:
        return
    for _, rows in part.groupby(TARGET, sort=True):
        rows = rows.reset_index(drop=True)
        ids, errors = token_arrays(rows[TOKENS]), rows[ERROR].tolist()
        keys = rows[key_col] if key_col is not None else [i if i is not None else [] for i in ids]
        out = generate_rows(rows[columns], ids, errors, spec, sampling, output_col, row_keys=keys)
        _partitions_run += 1
        yield _for_spark(out, schema)


def _plan_batches(batches: Iterator[pd.DataFrame], columns: list[str]) -> Iterator[pd.DataFrame]:
    for b in batches:
        yield b[columns].assign(prompt_tokens=token_counts(b[TOKENS]), prefix_key=b[KEY], prefix_len=b[KEY_LEN],
                                partition=b[TARGET], error=b[ERROR])


def _for_spark(out: pd.DataFrame, schema: T.StructType) -> pd.DataFrame:
    """`out` in the schema's column order, JSON fields of no single type as their JSON text."""
    for name in out.columns:
        if out[name].dtype == object and isinstance(schema[name].dataType, T.StringType):
            out[name] = [v if v is None or isinstance(v, str) else json.dumps(v) for v in out[name]]
    return out[schema.names]


def _spark_type(dtype: Any) -> T.DataType:
    """The Spark type of a completion column's pandas dtype (`worker.result_meta`, `json_columns.column_dtypes`)."""
    if pd.api.types.is_bool_dtype(dtype):
        return T.BooleanType()
    if pd.api.types.is_integer_dtype(dtype):
        return T.LongType()
    if pd.api.types.is_float_dtype(dtype):
        return T.DoubleType()
    return T.StringType()  # str, and object (JSON arrays, objects, mixed) as JSON text
