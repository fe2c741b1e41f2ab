"""Checking what callers pass to `Engine.generate`, before any work starts.

Per-call problems (a sampling list of the wrong length, a value that is not a
`SamplingParams`) raise `ValueError`; per-prompt problems (None, NaN, a
number, an empty prompt, one longer than the model's context, token ids out
of the vocabulary) become that prompt's error, and the rest of the call runs.
"""
from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .config import SamplingParams


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt's token ids, or why it cannot run.

    The ids stay the int64 array they were checked as: the prefix plan sorts and compares these arrays, and
    only each request's own suffix becomes a Python list (its `tokens`), not the whole prompt.
    """

    token_ids: np.ndarray  # [n] int64 (empty where refused)
    error: str | None = None

    @staticmethod
    def refused(error: str) -> PreparedPrompt:
        return PreparedPrompt(np.zeros(0, dtype=np.int64), error)


def sampling_list(sampling: SamplingParams | Mapping | Sequence | None, n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt (a single one, or a dict of its fields, applies to all)."""
    if sampling is None:
        return [SamplingParams()] * n
    if isinstance(sampling, (SamplingParams, Mapping)):
        return [_as_params(sampling)] * n
    items = list(sampling)
    if len(items) != n:
        raise ValueError(f"sampling: got {len(items)} SamplingParams for {n} prompts; give one, or one per prompt")
    return [_as_params(s) for s in items]


def _as_params(value: SamplingParams | Mapping) -> SamplingParams:
    if isinstance(value, SamplingParams):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - set(SamplingParams.field_names())
        if unknown:
            raise ValueError(f"sampling: unknown field(s) {sorted(unknown)}; known: {SamplingParams.field_names()}")
        return SamplingParams(**value)
    raise ValueError(f"sampling: expected SamplingParams or a dict of its fields, got {type(value).__name__}")


def prepare_prompt(prompt: object, tokenizer, vocab_size: int, max_model_len: int) -> PreparedPrompt:
    """Token ids for a text prompt or a sequence of ids, or the reason it is refused."""
    if isinstance(prompt, str):
        if not prompt:
            return PreparedPrompt.refused("empty prompt")
        ids = np.asarray(tokenizer.encode(prompt), dtype=np.int64)
    else:
        ids_or_error = _token_ids(prompt, vocab_size)
        if isinstance(ids_or_error, str):
            return PreparedPrompt.refused(ids_or_error)
        ids = ids_or_error
    if len(ids) == 0:
        return PreparedPrompt.refused("empty prompt")
    if len(ids) >= max_model_len:
        return PreparedPrompt.refused(f"prompt has {len(ids)} tokens; the model's context is {max_model_len} "
                                  "and at least one must be left to generate")
    return PreparedPrompt(ids)


def _token_ids(prompt: object, vocab_size: int) -> np.ndarray | str:
    """A sequence of integer ids as an int64 array (checked in numpy: prompts can be long), or an error
    message.  numpy infers the type of the elements (a float or a bool among them is refused, not cast)."""
    if isinstance(prompt, (bytes, Mapping)) or not hasattr(prompt, "__len__") or not hasattr(prompt, "__iter__"):
        return f"prompt must be a string or a list of token ids, got {_describe(prompt)}"
    ids = _int_list(prompt)
    if ids is None:
        try:
            ids = np.asarray(prompt)
        except (TypeError, ValueError):
            ids = np.asarray([], dtype=object)
    if ids.size == 0 and len(prompt) == 0:  # type: ignore[arg-type]
        return np.zeros(0, dtype=np.int64)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        return f"prompt must be a string or a list of token ids, got {_describe(prompt)}"
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        return f"token ids out of the vocabulary [0, {vocab_size}): {bad[:5].tolist()}"
    return ids.astype(np.int64, copy=False)


def _int_list(prompt: object) -> np.ndarray | None:
    """A list of Python ints as an int64 array, converted in C without numpy's inference of the elements'
    type (a third of the time for a long prompt), or None where that does not apply.

    `array('q')` refuses floats, strings and containers, and ints beyond int64, which then take numpy's
    path and its errors.  It takes bools among ints, as numpy does (its type for [5, True] is int64); a
    list that starts with a bool is left to numpy, which refuses one of bools only."""
    if type(prompt) is not list or not prompt or type(prompt[0]) is not int:
        return None
    try:
        return np.frombuffer(array("q", prompt), dtype=np.int64)
    except (TypeError, OverflowError):
        return None


def _describe(value: object) -> str:
    if value is None:
        return "None"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return f"{type(value).__name__} ({str(value)[:40]!r})"
