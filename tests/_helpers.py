"""Small helpers shared by test modules (pytest puts this folder on sys.path)."""
from __future__ import annotations

import json
import re

import dask
import dask.dataframe as dd
import pandas as pd


def trie_count(token_lists: list[list[int]]) -> int:
    """Distinct nodes of the plain (uncompressed) trie of the token lists: each shared prefix once."""
    trie: dict = {}
    count = 0
    for ids in token_lists:
        node = trie
        for t in ids:
            if t not in node:
                node[t] = {}
                count += 1
            node = node[t]
    return count


def to_dask(df: pd.DataFrame, npartitions: int) -> dd.DataFrame:
    """A Dask frame that keeps object columns as they are (Dask would turn non-text rows into strings)."""
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_pandas(df, npartitions=npartitions)


def spy_engine_prompts(monkeypatch) -> list:
    """A list that every prompt reaching this process's cached engine is appended to (run jobs on Dask's sync
    scheduler so that they reach this process)."""
    from batchllm_dask import worker
    seen: list = []
    real_get_engine = worker.get_engine

    def spying_get_engine(spec):
        cached = real_get_engine(spec)
        real_generate = cached.engine.generate

        class Spy:
            def generate(self, prompts, sampling, **kwargs):
                seen.extend(prompts)
                return real_generate(prompts, sampling, **kwargs)
        return type(cached)(cached.spec, Spy(), cached.lock)
    monkeypatch.setattr(worker, "get_engine", spying_get_engine)
    return seen


def kernel_device() -> str:
    """Where Triton kernels run in this test session: the interpreter on the CPU (conftest sets
    TRITON_INTERPRET=1 when there is no CUDA), else the GPU."""
    import os
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


# Structured output (test_structured*.py): a schema whose every output is short, and the validity check.
SCHEMA = {"type": "object", "properties": {
    "label": {"enum": ["positive", "negative", "mixed"]},
    "score": {"type": "integer", "minimum": 0, "maximum": 100},
    "ok": {"type": "boolean"},
    "name": {"type": "string", "pattern": "^[a-z]{1,8}$"}},
    "required": ["label", "score", "ok", "name"]}
DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"


def assert_valid(text: str, params) -> None:
    """The text satisfies the SamplingParams' constraint: validates against its schema, matches its regex,
    or is one of its choices."""
    import jsonschema
    kind, value = params.constraint
    if kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(value))
    elif kind == "regex":
        assert re.fullmatch(value, text), text
    else:
        assert text in value, text
