"""Process-level caches: this process's engine and its tokenizers.

A Dask worker process runs many partitions.  Loading a model for each would
cost more than generating, so every process keeps its `Engine` in a module
level cache keyed by `EngineSpec` (model path + engine options): the first
partition loads it, every later partition of that process reuses it.  Only one
engine is kept per process, because an engine takes most of the GPU's memory
for its KV pool: asking for another spec releases the previous one.

The same cache serves Dask's threaded scheduler (no cluster) and the pandas
path; a lock per engine serializes `generate` calls, which are not thread-safe
and gain nothing from running side by side on one device.  Tokenizers are
cached per path beside it (the `tokenizer` option's, else the model's:
`EngineSpec.tokenizer_source`), for the tokenizing tasks of `planning`.

This module sits below both `planning` and `worker` (and `spark`): layers read
one way, accessor -> planning / worker -> caches -> engine.

`engine_loads()` tells how many engines this process has built; tests call it
on every worker with `client.run(engine_loads)`.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EngineSpec:
    """What identifies an engine: the checkpoint directory and the `EngineConfig` options.

    `options` is a sorted tuple of (name, value) pairs so that the spec hashes
    and pickles cheaply (it travels inside every task of the graph).
    """

    model: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def make(cls, model: str, options: dict[str, Any]) -> "EngineSpec":
        """A spec whose model (and tokenizer) path is absolute where it exists here (workers may run elsewhere
        in the tree)."""
        if options.get("tokenizer") is not None:
            options = {**options, "tokenizer": _absolute(options["tokenizer"])}
        return cls(_absolute(model), tuple(sorted(options.items())))

    @property
    def tokenizer(self) -> str | None:
        """The `tokenizer` option: a path to load the tokenizer from instead of the model's, or None."""
        return dict(self.options).get("tokenizer")

    @property
    def tokenizer_source(self) -> str:
        """Where text prompts are tokenized from: the tokenizer option, else the model (planning and workers)."""
        return self.tokenizer or self.model

    def check_files(self) -> None:
        """Raise now, naming the file and the problem, if the model or tokenizer cannot load (engine/files.py);
        paths this machine does not see are left to the workers."""
        from .engine.files import check_visible_model
        check_visible_model(self.model, self.tokenizer)

    def build(self) -> Any:
        from .engine import Engine  # torch is imported here, on the worker, not by the client
        return Engine(self.model, **dict(self.options))


def _absolute(path: Any) -> str:
    resolved = Path(path).expanduser()
    return str(resolved.resolve()) if resolved.exists() else str(path)


@dataclass
class _Cached:
    spec: EngineSpec
    engine: Any
    lock: threading.Lock = field(default_factory=threading.Lock)


_cache_lock = threading.Lock()
_engine: _Cached | None = None
_loads = 0
_tokenizers: dict[str, tuple[Any, threading.Lock]] = {}


def get_engine(spec: EngineSpec) -> _Cached:
    """This process's engine for `spec`, built on first use (and the lock guarding it)."""
    global _engine, _loads
    with _cache_lock:
        if _engine is None or _engine.spec != spec:
            if _engine is not None:  # free the previous engine's weights and KV pool before the next loads
                _engine = None
                _release_memory()
            _engine = _Cached(spec, spec.build())
            _loads += 1
        return _engine


def engine_loads() -> int:
    """How many engines this process has built (a test reads it on each worker)."""
    return _loads


def engine_stats() -> Any:
    """The `last_stats` of this process's engine (None before its first call): read with `client.run`."""
    return _engine.engine.last_stats if _engine is not None else None


def clear_engine() -> None:
    """Drop this process's engine (frees its weights and KV pool)."""
    global _engine
    with _cache_lock:
        _engine = None
        _release_memory()


def _release_memory() -> None:
    import gc
    import sys
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def get_tokenizer(model: str) -> tuple[Any, threading.Lock]:
    """This process's tokenizer of `model` (a path: `EngineSpec.tokenizer_source`) and a lock: a fast tokenizer
    is not safe across threads.  A folder without tokenizer files raises FileNotFoundError naming it (and is
    not cached: a folder that gains them later loads)."""
    with _cache_lock:
        if model not in _tokenizers:
            from .engine.loader import load_tokenizer
            from .engine.model_cache import tokenizer_dir  # a GGUF model: its tokenizer, converted once
            _tokenizers[model] = (load_tokenizer(tokenizer_dir(model)), threading.Lock())
        return _tokenizers[model]
