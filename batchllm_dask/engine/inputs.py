"""Checking what callers pass to `Engine.generate`, before any work starts.

Per-call problems (a sampling list of the wrong length, a value that is not a
`SamplingParams`) raise `ValueError`; per-prompt problems (None, NaN, a
number, an empty prompt, one longer than the model's context, token ids out
of the vocabulary) become that prompt's error, and the rest of the call runs.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import SamplingParams


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt's token ids, or why it cannot run."""

    token_ids: list[int]
    error: str | None = None


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
    """Token ids for a text prompt or a list of ids, or the reason it is refused."""
    if isinstance(prompt, str):
        if not prompt:
            return PreparedPrompt([], "empty prompt")
        ids = list(tokenizer.encode(prompt))
    elif _is_token_list(prompt):
        ids = [int(t) for t in prompt]  # type: ignore[union-attr]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            return PreparedPrompt([], f"token ids out of the vocabulary [0, {vocab_size}): {bad[:5]}")
    else:
        return PreparedPrompt([], f"prompt must be a string or a list of token ids, got {_describe(prompt)}")
    if not ids:
        return PreparedPrompt([], "empty prompt")
    if len(ids) >= max_model_len:
        return PreparedPrompt([], f"prompt has {len(ids)} tokens; the model's context is {max_model_len} "
                                  "and at least one must be left to generate")
    return PreparedPrompt(ids)


def _is_token_list(value: object) -> bool:
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__") or not hasattr(value, "__len__"):
        return False
    return all(_is_int_like(t) for t in value)  # type: ignore[union-attr]


def _is_int_like(value: object) -> bool:
    return hasattr(value, "__index__") and not isinstance(value, bool)


def _describe(value: object) -> str:
    if value is None:
        return "None"
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return f"{type(value).__name__} ({str(value)[:40]!r})"
