"""batchllm-dask: offline large-batch LLM inference over dataframes (BatchLLM on Dask).

    import dask.dataframe as dd, batchllm_dask
    out = dd.read_parquet("rows.parquet").llm.generate("prompt", model="/models/llama", max_tokens=64)
    with batchllm_dask.gpu_resources():   # a no-op unless the cluster's workers declare GPUs
        out.to_parquet("answers.parquet")

Importing registers the `.llm` accessor on pandas and Dask DataFrames and
Series.  The engine (and torch) is imported only when first used: `Engine`,
`SamplingParams`, `EngineConfig`, `default_model_path`, `embedded_model_path`, `JobStats` and
`PlanReport` are resolved lazily.
"""
from __future__ import annotations

from typing import Any

from .accessor import LLMAccessor, LLMSeriesAccessor, generate
from .caches import engine_loads
from .worker import gpu_resources

__all__ = ["Engine", "SamplingParams", "EngineConfig", "Completion", "generate", "default_model_path",
           "embedded_model_path", "JobStats", "PlanReport",
           "gpu_resources", "engine_loads", "LLMAccessor", "LLMSeriesAccessor"]

_LAZY = {
    "Engine": ("batchllm_dask.engine", "Engine"),
    "Completion": ("batchllm_dask.engine", "Completion"),
    "SamplingParams": ("batchllm_dask.engine.config", "SamplingParams"),
    "EngineConfig": ("batchllm_dask.engine.config", "EngineConfig"),
    "default_model_path": ("batchllm_dask.engine.default_model", "default_model_path"),
    "embedded_model_path": ("batchllm_dask.engine.embedded", "embedded_model_path"),
    "JobStats": ("batchllm_dask.stats", "JobStats"),
    "PlanReport": ("batchllm_dask.plan_report", "PlanReport"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'batchllm_dask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
