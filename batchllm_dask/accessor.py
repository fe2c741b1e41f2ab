"""The `.llm` accessor of pandas and Dask DataFrames and Series, and the function form `generate`.

    import dask.dataframe as dd, batchllm_dask
    out = dd.read_parquet("rows.parquet").llm.generate("prompt", model="/models/llama", max_tokens=64)
    out.to_parquet("answers.parquet")

A Dask call returns a lazy frame: `map_partitions(run_partition, ..., meta=...)`
over the prefix-aware shuffle of `planning.shuffle_to_plan`, with an explicit
meta, so no model loads until the result is computed.  The plan itself is
computed when `generate` is called, as Dask's own `set_index` computes its
divisions: the prompts are tokenized and their prefix counts reduced to a
`PrefixPlan` on the client (`planning.compute_plan`; the rows are tokenized
again inside the job, see planning.py for why), because the shuffle's graph
needs the number of output partitions, and with `partition_tokens` that
number follows the job's cost.  The plan's partitions are then placed over
the GPU workers by cost (`assignment.note_plan`, applied in `gpu_resources()`).
When the whole job fits in one partition there is nothing to shuffle: the
input is repartitioned into one and a single `generate_partition` task
tokenizes and generates (with `partition_tokens=None` and one partition that
is decided without computing anything).
With `checkpoint=`, finished partitions are recorded in a folder and a re-run
generates only the rows not recorded yet (checkpoint.py).
Arguments are checked here, eagerly: a missing column raises `KeyError`, a bad
sampling or engine value `ValueError`, an unknown option `TypeError`.

The result has the input's rows, columns and index, plus `output_col`
("completion"), prompt_tokens, completion_tokens, finish_reason and error.
With a `json_schema`, the schema's top-level fields follow as typed columns
(`json_columns.py`).
A pandas call runs at once and keeps the input's row order.  A Dask result
keeps every row's index but not the order of rows: rows are grouped by shared
prefix into new partitions (divisions unknown); `.sort_index()` or a join on
the index gives the input's order back.  With one output partition nothing
is shuffled and the input's order is kept.

On a cluster whose workers declare GPUs as resources, compute inside
`batchllm_dask.gpu_resources()` so that generation runs on GPU workers.
"""
from __future__ import annotations

import os
from typing import Any

import pandas as pd

from .planning import (DEFAULT_PARTITION_TOKENS, ERROR, KEY, KEY_LEN, TARGET, TOKENS, compute_plan, drop_internal,
                       restore_index, shuffle_to_plan, token_counts, tokenize)
from .json_columns import check_field_names
from .worker import EngineSpec, cluster_workers, generate_partition, result_columns, result_meta, run_partition


def _dask_dataframe_types() -> tuple[type, type]:
    import dask.dataframe as dd
    return dd.DataFrame, dd.Series


def _is_dask(obj: Any) -> bool:
    return isinstance(obj, _dask_dataframe_types())


def split_options(options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(SamplingParams, EngineConfig options) from generate's keyword options, both validated now."""
    from .engine.config import EngineConfig, SamplingParams  # lazy: keeps `import batchllm_dask` light
    sampling_names, engine_names = set(SamplingParams.field_names()), {f for f in EngineConfig.__dataclass_fields__}
    unknown = sorted(set(options) - sampling_names - engine_names)
    if unknown:
        raise TypeError(f"generate() got unknown options {unknown}; sampling options are "
                        f"{sorted(sampling_names)}, engine options {sorted(engine_names)}")
    sampling = SamplingParams(**{k: v for k, v in options.items() if k in sampling_names})
    # `seed` names both; it is the rows' sampling seed (each row's own, row_sampling.py), never a reason to
    # build another engine
    engine = {k: v for k, v in options.items() if k in engine_names and k not in sampling_names}
    EngineConfig(**engine)  # raises ValueError naming the field
    return sampling, engine


def _check_column(columns: Any, name: str) -> None:
    if name not in columns:
        raise KeyError(f"column {name!r} not found; the columns are {list(columns)}")


def _check_args(output_col: Any, chat: Any, npartitions: Any, partition_tokens: Any = None) -> None:
    if not isinstance(output_col, str) or not output_col:
        raise ValueError(f"output_col: must be a non-empty string, got {output_col!r}")
    if not isinstance(chat, bool):
        raise ValueError(f"chat: must be a bool, got {chat!r}")
    if npartitions is not None and not (_is_int(npartitions) and npartitions >= 1):
        raise ValueError(f"npartitions: must be an integer >= 1 or None, got {npartitions!r}")
    if partition_tokens is not None and not (_is_int(partition_tokens) and partition_tokens >= 1):
        raise ValueError(f"partition_tokens: must be an integer >= 1, or None for no bound, got {partition_tokens!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_npartitions(ddf: Any) -> int:
    """One output partition per GPU worker (else per worker) of the current client, else as many as the input.

    Fewer, larger partitions batch better: each partition is one
    `Engine.generate` call, and a worker runs its partitions one after another.
    """
    workers, gpus = cluster_workers()
    return gpus or workers or ddf.npartitions


def _generate_pandas(df: pd.DataFrame, prompt_col: str, spec: EngineSpec, sampling: Any,
                     chat: bool, output_col: str) -> pd.DataFrame:
    """All rows in one `Engine.generate` call (the engine shares prefixes across them), in the input's order."""
    return generate_partition(df, prompt_col, spec, sampling, chat, output_col)


def _generate_dask(ddf: Any, prompt_col: str, spec: EngineSpec, sampling: Any, chat: bool,
                   output_col: str, npartitions: int | None, partition_tokens: int | None) -> Any:
    """The lazy job over `ddf`, its plan computed now (see the module docstring)."""
    from .assignment import clear_placement, note_plan
    n = npartitions or default_npartitions(ddf)
    meta = result_meta(ddf._meta, output_col, sampling)
    if n == 1 and partition_tokens is None:  # asked for one unbounded partition: nothing to plan
        clear_placement()
        return _one_partition(ddf, prompt_col, spec, sampling, chat, output_col, meta)
    tok = tokenize(ddf, prompt_col, spec.tokenizer_source, chat=chat)  # the spec's resolved path
    plan = compute_plan(tok, max_tokens=sampling.max_tokens, npartitions=n, partition_tokens=partition_tokens)
    note_plan(plan)
    if plan.npartitions == 1:  # the job fits in one partition: no shuffle, tokenized in that one task
        return _one_partition(ddf, prompt_col, spec, sampling, chat, output_col, meta)
    names = list(ddf._meta.index.names)
    return shuffle_to_plan(tok, plan).map_partitions(run_partition, spec, sampling, output_col, names, meta=meta,
                                                     clear_divisions=True)


def _one_partition(ddf: Any, prompt_col: str, spec: EngineSpec, sampling: Any, chat: bool, output_col: str,
                   meta: pd.DataFrame) -> Any:
    """One engine call sees every row, in the input's order: one task tokenizes and generates."""
    return ddf.repartition(npartitions=1).map_partitions(generate_partition, prompt_col, spec, sampling, chat,
                                                         output_col, meta=meta)


def _generate_checkpointed(ddf: Any, prompt_col: str, spec: EngineSpec, sampling: Any, chat: bool,
                           output_col: str, npartitions: int | None, partition_tokens: int | None,
                           checkpoint: Any) -> Any:
    """The job over the rows `checkpoint` has not finished, recorded there, plus the finished rows read back."""
    from .checkpoint import Checkpoint, job_manifest, resume
    manifest = job_manifest(spec.model, sampling, dict(spec.options), prompt_col, output_col, chat)
    folder = Checkpoint.open(checkpoint, manifest)
    meta = result_meta(ddf._meta, output_col, sampling)
    return resume(ddf, folder, lambda todo: _generate_dask(todo, prompt_col, spec, sampling, chat, output_col,
                                                           npartitions, partition_tokens),
                  meta, sampling, output_col)


def generate(df: Any, prompt_col: str, model: str, *, output_col: str = "completion", chat: bool = False,
             npartitions: int | None = None, partition_tokens: int | None = DEFAULT_PARTITION_TOKENS,
             checkpoint: str | os.PathLike | None = None, **options: Any) -> Any:
    """Every row's completion of `df[prompt_col]`; same kind of object back (see the module docstring).

    prompt_col: a column of text, of token-id lists, or of chat messages
        (lists of {"role", "content"} dicts); `chat=True` wraps text rows as
        one user message; messages go through the tokenizer's chat template.
    model: a local Hugging Face checkpoint directory or a GGUF file (converted once, engine/model_cache.py),
        loaded once per worker process.
    options: `SamplingParams` fields (max_tokens, temperature, top_p, top_k,
        seed, stop, stop_token_ids, ignore_eos; one constraint of json_schema,
        regex, choice) and `EngineConfig` fields (dtype, device, kv_cache_bytes,
        page_size, ...).  With `json_schema` (a dict or a pydantic model class)
        the result also has the schema's top-level fields as typed columns
        (see `json_columns`); a field named like a column of the result is a
        ValueError.
    npartitions (Dask only): the fewest output partitions; default one per (GPU) worker
        of the current distributed client, else the input's number.
    partition_tokens (Dask only): the bound on one output partition's estimated cost (prompt tokens after
        sharing plus max_tokens per row; `planning.DEFAULT_PARTITION_TOKENS`, minutes of GPU time on an 8B
        model): the plan has as many partitions as the job's cost needs, never fewer than `npartitions`.
        A prefix group that fits stays whole, so a partition may exceed the bound by up to one group.
        None: no bound, exactly `npartitions`.  The plan is computed when `generate` is called
        (the prompts are tokenized once for it), the generation when the result is.
    checkpoint (Dask only): a folder that every worker and the client see; each finished partition's
        rows are recorded there as it completes, and the same call run again (after an interruption)
        generates only the rows not recorded yet and reads the others back (checkpoint.py).  Rows are
        identified by their index, which must then be unique.  Resuming with another model, other
        sampling options, dtype, prompt column or output column is a ValueError naming what differs.

    Bad rows (null, NaN, empty, non-text, too long) get finish_reason "error"
    and a message in `error`; the other rows complete.
    """
    if not isinstance(df, (pd.DataFrame, pd.Series)) and not _is_dask(df):
        raise TypeError(f"generate() takes a pandas or Dask DataFrame or Series, got {type(df).__name__}")
    _check_args(output_col, chat, npartitions, partition_tokens)
    if checkpoint is not None and not _is_dask(df):
        raise TypeError("checkpoint: needs a Dask DataFrame or Series (a pandas frame runs as one engine call, "
                        "so there is nothing to resume); use dd.from_pandas(df, npartitions=...)")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(f"checkpoint: must be a folder path, got {type(checkpoint).__name__}")
    sampling, engine_options = split_options(options)
    spec = EngineSpec.make(str(model), engine_options)
    spec.check_files()  # a bad checkpoint or tokenizer raises here, before any task runs (engine/files.py)
    if isinstance(df, (pd.Series, _dask_dataframe_types()[1])):
        frame = df.to_frame(name=_SERIES_PROMPT)
        out = generate(frame, _SERIES_PROMPT, model, output_col=output_col, chat=chat, npartitions=npartitions,
                       partition_tokens=partition_tokens, checkpoint=checkpoint, **options)
        return out[output_col]
    _check_column(df.columns, prompt_col)
    if sampling.json_schema is not None:
        check_field_names(sampling.json_schema, [*df.columns, *result_columns(pd.RangeIndex(0), [], [], output_col)])
    if isinstance(df, pd.DataFrame):
        return _generate_pandas(df, prompt_col, spec, sampling, chat, output_col)
    if checkpoint is not None:
        return _generate_checkpointed(df, prompt_col, spec, sampling, chat, output_col, npartitions,
                                      partition_tokens, checkpoint)
    return _generate_dask(df, prompt_col, spec, sampling, chat, output_col, npartitions, partition_tokens)


def plan(ddf: Any, prompt_col: str, model: str, *, chat: bool = False, max_tokens: int = 16,
         npartitions: int | None = None, partition_tokens: int | None = DEFAULT_PARTITION_TOKENS) -> Any:
    """The partitions `generate` would run: the input plus prefix_key, prefix_len, partition, error.

    Rows of one shared prefix (same `prefix_key`, 0 for a row that shares
    nothing) are in one partition unless their group is larger than a partition.
    The plan is computed now (as `generate` does); the rows are shuffled lazily.
    """
    _check_args("x", chat, npartitions, partition_tokens)
    _check_column(ddf.columns, prompt_col)
    n = npartitions or default_npartitions(ddf)
    spec = EngineSpec.make(str(model), {})
    spec.check_files()  # a bad checkpoint raises here, before any task runs (engine/files.py)
    tok = tokenize(ddf, prompt_col, spec.tokenizer_source, chat=chat)
    planned = shuffle_to_plan(tok, compute_plan(tok, max_tokens=max_tokens, npartitions=n,
                                                partition_tokens=partition_tokens))
    meta = _plan_view(planned._meta.assign(**{TARGET: planned._meta.index}), list(ddf._meta.index.names))
    return planned.map_partitions(_plan_partition, list(ddf._meta.index.names), meta=meta, clear_divisions=True)


def _plan_partition(part: pd.DataFrame, names: list[Any]) -> pd.DataFrame:
    return _plan_view(part.assign(**{TARGET: part.index.to_numpy()}), names)


def _plan_view(part: pd.DataFrame, names: list[Any]) -> pd.DataFrame:
    view = drop_internal(part).assign(prompt_tokens=token_counts(part[TOKENS]),
                                      prefix_key=part[KEY], prefix_len=part[KEY_LEN],
                                      partition=part[TARGET].astype("int64"), error=part[ERROR])
    return restore_index(view, names)


_SERIES_PROMPT = "_bl_prompt"


class LLMAccessor:
    """`df.llm`: LLM generation over the rows of a pandas or Dask DataFrame."""

    def __init__(self, obj: Any) -> None:
        # Raise TypeError, never AttributeError: attribute lookup would swallow the latter.
        if not isinstance(obj, pd.DataFrame) and not _is_dask(obj):
            raise TypeError(f".llm needs a pandas or Dask DataFrame, got {type(obj).__name__}")
        self._obj = obj

    def generate(self, prompt_col: str, model: str, *, output_col: str = "completion", chat: bool = False,
                 npartitions: int | None = None, partition_tokens: int | None = DEFAULT_PARTITION_TOKENS,
                 checkpoint: str | os.PathLike | None = None, **options: Any) -> Any:
        """Each row's completion of `prompt_col`; see `batchllm_dask.generate`."""
        return generate(self._obj, prompt_col, model, output_col=output_col, chat=chat, npartitions=npartitions,
                        partition_tokens=partition_tokens, checkpoint=checkpoint, **options)

    def plan(self, prompt_col: str, model: str, *, chat: bool = False, max_tokens: int = 16,
             npartitions: int | None = None, partition_tokens: int | None = DEFAULT_PARTITION_TOKENS) -> Any:
        """The prefix-aware partitions `generate` runs (Dask only); see `batchllm_dask.accessor.plan`."""
        if not _is_dask(self._obj):
            raise TypeError("plan() shows how a Dask DataFrame is partitioned; a pandas frame runs as one batch")
        return plan(self._obj, prompt_col, model, chat=chat, max_tokens=max_tokens, npartitions=npartitions,
                    partition_tokens=partition_tokens)

    def plan_report(self, prompt_col: str, model: str, *, chat: bool = False, max_tokens: int = 16,
                    npartitions: int | None = None, partition_tokens: int | None = DEFAULT_PARTITION_TOKENS,
                    device: str = "h100") -> Any:
        """What `generate` will cost, computed now without loading weights; see `plan_report.plan_report`."""
        if not _is_dask(self._obj):
            raise TypeError("plan_report() plans a Dask DataFrame; wrap a pandas frame with dd.from_pandas")
        from .plan_report import plan_report
        return plan_report(self._obj, prompt_col, model, chat=chat, max_tokens=max_tokens,
                           npartitions=npartitions, partition_tokens=partition_tokens, device=device)

    def stats(self, wall_seconds: float | None = None) -> Any:
        """`JobStats` of a generate() result: rows, errors by kind, prompt tokens computed after sharing, ...

        On a Dask result it computes the columns it needs: call it on a persisted or re-read result.
        """
        from .stats import job_stats
        return job_stats(self._obj, wall_seconds)


class LLMSeriesAccessor:
    """`series.llm`: LLM generation over a Series of prompts; returns the completions as a Series."""

    def __init__(self, obj: Any) -> None:
        if not isinstance(obj, pd.Series) and not _is_dask(obj):
            raise TypeError(f".llm needs a pandas or Dask Series, got {type(obj).__name__}")
        self._obj = obj

    def generate(self, model: str, *, output_col: str = "completion", chat: bool = False,
                 npartitions: int | None = None, partition_tokens: int | None = DEFAULT_PARTITION_TOKENS,
                 checkpoint: str | os.PathLike | None = None, **options: Any) -> Any:
        """The completion of every prompt of the Series, named `output_col`, with the Series' index."""
        return generate(self._obj, _SERIES_PROMPT, model, output_col=output_col, chat=chat, npartitions=npartitions,
                        partition_tokens=partition_tokens, checkpoint=checkpoint, **options)


def _register() -> None:
    import dask.dataframe.extensions as dx
    pd.api.extensions.register_dataframe_accessor("llm")(LLMAccessor)
    pd.api.extensions.register_series_accessor("llm")(LLMSeriesAccessor)
    dx.register_dataframe_accessor("llm")(LLMAccessor)
    dx.register_series_accessor("llm")(LLMSeriesAccessor)


_register()
