"""The partition runner: a partition's rows through this process's engine, completion columns out.

The engine and tokenizer caches it uses live in `caches.py`.  On a
`distributed` worker, `profiler_paused` stops the worker's statistical profiler
while the engine generates (see its docstring for why).
"""
from __future__ import annotations

import sys
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any, Iterator

import pandas as pd

from .caches import EngineSpec, engine_loads, engine_stats, get_engine  # noqa: F401 - re-exported
from . import progress
from .json_columns import add_field_columns
from .row_sampling import per_row_sampling
from .planning import ERROR, TOKENS, drop_internal, restore_index, token_arrays, tokenize_rows


def run_partition(part: pd.DataFrame, spec: EngineSpec, sampling: Any, output_col: str,
                  index_names: list[Any] | None = None) -> pd.DataFrame:
    """Generate every row of a planned partition: token ids in, completion columns out.

    `part` carries the token ids (`planning.TOKENS`) and any tokenization error
    (`planning.ERROR`).  The internal columns are dropped and, when
    `index_names` is given, the original index (stashed by the planner before
    the shuffle) is restored.
    """
    rows = drop_internal(part)
    if index_names is not None:  # first: a sampled row's seed comes from its own index (row_sampling.py)
        rows = restore_index(rows, index_names)
    return generate_rows(rows, token_arrays(part[TOKENS]), part[ERROR].tolist(), spec, sampling, output_col)


def generate_partition(part: pd.DataFrame, prompt_col: str, spec: EngineSpec, sampling: Any, chat: bool,
                       output_col: str) -> pd.DataFrame:
    """Tokenize and generate every row of `part` in one go: the pandas path, and a Dask job of one partition.

    One task instead of two, and no trip of the token ids through an Arrow column.
    """
    ids, errors = tokenize_rows(part, prompt_col, spec.tokenizer_source, chat)
    return generate_rows(part, ids, errors, spec, sampling, output_col)


def generate_rows(part: pd.DataFrame, ids: list[Any], errors: list[Any], spec: EngineSpec, sampling: Any,
                  output_col: str, row_keys: Any = None) -> pd.DataFrame:
    """`part` plus the completion columns (and, with a JSON schema, its fields): rows without an error go
    to one `Engine.generate` call, the rest keep their error.

    A sampled row is seeded from its index value (`row_sampling`), so its completion does not depend on
    the partition it ran in; `row_keys` replaces the index as that key (Spark, which has no index).
    """
    todo = [i for i, e in enumerate(errors) if not isinstance(e, str)]
    results: list[Any] = [None] * len(part)
    if todo:
        cached = get_engine(spec)
        prompts = [ids[i] for i in todo]  # lists or numpy arrays: the engine checks and converts them once
        params = per_row_sampling(sampling, part.index if row_keys is None else row_keys)
        params = params if not isinstance(params, list) else [params[i] for i in todo]
        with cached.lock, profiler_paused():
            outs = cached.engine.generate(prompts, params, progress=progress.count)
        for i, out in zip(todo, outs):
            results[i] = out
    progress.count(len(part) - len(todo), 0)  # rows that never reached the engine are finished too
    return part.assign(**with_schema_fields(result_columns(part.index, results, errors, output_col), sampling,
                                            output_col))


PAUSE_PROFILER = "batchllm.pause-worker-profiler"  # dask config key; default True


@contextmanager
def profiler_paused() -> Iterator[bool]:
    """Stop this process's Dask worker profiler inside the block, then start it again; yields whether it did.

    A `distributed` worker samples the stack of every running task every 10 ms
    (`distributed.worker.profile.interval`) on its event loop thread.  The
    engine's step loop is host-bound: it launches kernels, and every launch
    lets go of the GIL and must take it back, behind the sampler when it is
    waiting.  On the H100 the sampler held the GIL for 0.11-0.16 s of every
    7 s run (BENCHMARKS.md, Dask layer): small, below the run-to-run noise, but
    spent on the engine's critical path for a profile of code whose time is on
    the GPU.  Only the engine's own `generate` runs unprofiled; reading,
    tokenizing and shuffling are still sampled.

    Does nothing outside a worker, when the worker does not profile, or when
    the dask config sets `batchllm.pause-worker-profiler: false` (to see the
    engine in the dashboard's profile).
    """
    worker, callback = _worker_profiler()
    if callback is None or not callback.is_running() or not _on_loop(worker, callback.stop):
        yield False
        return
    try:
        yield True
    finally:
        _on_loop(worker, callback.start)


def _worker_profiler() -> tuple[Any, Any]:
    """(this task's worker, its profile PeriodicCallback), or (None, None): no worker, no profiling, pausing off."""
    if "distributed" not in sys.modules:  # nothing imported distributed: this is no worker
        return None, None
    import dask
    from distributed import get_worker
    if not dask.config.get(PAUSE_PROFILER, True):
        return None, None
    try:
        worker = get_worker()
    except ValueError:
        return None, None
    return worker, getattr(worker, "periodic_callbacks", {}).get("profile")


def _on_loop(worker: Any, fn: Any) -> bool:
    """Run fn on the worker's event loop (a PeriodicCallback belongs to its loop), wait, and say if it ran.

    Pausing the profiler is an optimization: a loop that is closing or does not answer gets a warning, and the
    generation goes on.
    """
    done: Future = Future()

    def call() -> None:
        try:
            done.set_result(fn())
        except Exception as exc:  # noqa: BLE001 - handed to the waiting thread
            done.set_exception(exc)
    try:
        worker.loop.asyncio_loop.call_soon_threadsafe(call)
        done.result(timeout=10)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure here must not fail the rows
        warnings.warn(f"could not pause or resume the Dask worker's profiler: {exc!r}", RuntimeWarning, stacklevel=3)
        return False


def result_columns(index: pd.Index, results: list[Any], errors: list[Any], output_col: str) -> dict[str, pd.Series]:
    """The completion columns: engine results where there are some, else the row's error."""
    def col(values: list[Any], dtype: str) -> pd.Series:
        return pd.Series(values, index=index, dtype=dtype)
    ok = [r is not None for r in results]
    return {
        output_col: col([r.text if r is not None and r.finish_reason != "error" else None for r in results], "str"),
        "prompt_tokens": col([r.prompt_tokens if k else 0 for r, k in zip(results, ok)], "int64"),
        "completion_tokens": col([r.completion_tokens if k else 0 for r, k in zip(results, ok)], "int64"),
        # prompt tokens read from a shared prefix another row of the partition computed (see Completion)
        "cached_tokens": col([r.cached_tokens if k else 0 for r, k in zip(results, ok)], "int64"),
        "finish_reason": col([r.finish_reason if k else "error" for r, k in zip(results, ok)], "str"),
        "error": col([r.error if k else e for r, k, e in zip(results, ok, errors)], "str"),
    }


def with_schema_fields(columns: dict[str, pd.Series], sampling: Any, output_col: str) -> dict[str, pd.Series]:
    """The completion columns plus the JSON schema's typed fields when the sampling has a schema (json_columns.py)."""
    schema = getattr(sampling, "json_schema", None)
    return columns if schema is None else add_field_columns(columns, schema, output_col)


def result_meta(meta: pd.DataFrame, output_col: str, sampling: Any = None) -> pd.DataFrame:
    """`meta` plus the completion columns (and the schema's fields), with the dtypes `run_partition` produces."""
    return meta.assign(**with_schema_fields(result_columns(meta.index, [], [], output_col), sampling, output_col))


# ----------------------------------------------------------------------------- GPU placement

def _current_client(client: Any = None) -> Any:
    if client is not None:
        return client
    try:
        from distributed import default_client
        return default_client()
    except (ImportError, ValueError):
        return None


def cluster_workers(client: Any = None) -> tuple[int, int]:
    """(workers, workers declaring a "GPU" resource) of the current distributed client; (0, 0) without one."""
    client = _current_client(client)
    if client is None:
        return 0, 0
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    gpus = sum(1 for w in workers.values() if (w.get("resources") or {}).get("GPU", 0) >= 1)
    return len(workers), gpus


@contextmanager
def gpu_resources(client: Any = None, gpus: int = 1) -> Iterator[bool]:
    """Run what is computed inside on GPU workers, one task per GPU at a time.

        with batchllm_dask.gpu_resources():
            out.to_parquet("answers.parquet")

    When the current `distributed` client's workers declare a "GPU" resource
    (`LocalCluster(resources={"GPU": 1})`, `dask-worker --resources GPU=1`)
    this enters `dask.annotate(resources={"GPU": 1})`; otherwise (no cluster,
    no GPU resources, `dask_cuda.LocalCUDACluster` with one worker per GPU and
    one thread) it does nothing.  Under dask-expr annotations take effect when
    the graph is submitted, so the `compute`/`to_parquet` call itself must be
    inside the block, and they apply to every task of that graph: reading,
    tokenizing and shuffling also run on the GPU workers, which is where the
    rows must go anyway.  Yields whether the annotation was applied.

    gpus: the GPUs one task takes: a tensor-parallel engine's `tensor_parallel_size`, on a worker that owns
    that many (`dask worker --resources GPU=2`).
    The partitions of the last planned job go to the workers `assignment.note_plan` chose (cost-balanced).
    """
    import dask
    from .assignment import pending_placement, placement

    with placement(pending_placement()), warnings.catch_warnings():
        # dask-expr warns that annotations are ignored whenever a collection is built inside the block
        # (to_parquet builds some); the client still applies them when it submits the graph.
        warnings.filterwarnings("ignore", message="Dask annotations .* detected")
        if cluster_workers(client)[1] == 0:
            yield False
            return
        if gpus > 1 and not _workers_with_gpus(client, gpus):
            raise ValueError(f"gpus={gpus}: no worker of the cluster declares that many (--resources GPU={gpus})")
        with dask.annotate(resources={"GPU": gpus}):
            yield True


def _workers_with_gpus(client: Any, gpus: int) -> list[str]:
    workers = _current_client(client).scheduler_info(n_workers=-1).get("workers", {})
    return [a for a, w in workers.items() if (w.get("resources") or {}).get("GPU", 0) >= gpus]
