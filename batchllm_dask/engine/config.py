"""User-facing configuration: how to sample (`SamplingParams`) and how to run (`EngineConfig`).

Both are plain dataclasses validated in `__post_init__`, so a bad value raises a
`ValueError` naming the field before any work starts.  Derived quantities (the
number of KV pages, for instance) are computed by the components that need
them and never written back here.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any

from . import constraints

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name}: {message}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _as_tuple(value: object, name: str, what: str) -> tuple:
    """A list-like field as a tuple; a ValueError naming the field for a value that is not a list (5, a dict)."""
    listlike = hasattr(value, "__iter__") and not isinstance(value, (str, bytes, dict))
    _check(listlike, name, f"must be {what}, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each request's tokens (the vLLM / OpenAI conventions).

    temperature 0 is greedy.  `seed` makes a sampled request reproducible
    whatever else is in the batch and in whatever order it runs.  `stop`
    strings end the completion and are not part of its text; `stop_token_ids`
    and the model's EOS end it too (unless `ignore_eos`).

    At most one constraint on the completion (engine/constraints.py, decoded by
    engine/structured.py): `json_schema` (a dict, JSON text or a pydantic model
    class; kept as compact JSON text), `regex`, or `choice` (a list of strings;
    kept as a tuple).  A constrained request ends when its grammar does (reason
    "stop"), or earlier by EOS, a stop or max_tokens ("length": then a JSON
    output is cut short).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    json_schema: Any = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Accept a single string and any iterable for the tuple fields.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif self.stop is None:
            object.__setattr__(self, "stop", ())
        if self.stop_token_ids is None:
            object.__setattr__(self, "stop_token_ids", ())
        object.__setattr__(self, "stop", _as_tuple(self.stop, "stop", "a string or a list of strings"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids",
                                                             "a list of token ids"))
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens",
               f"must be an integer >= 1, got {self.max_tokens!r}")
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature",
               f"must be a finite number >= 0, got {self.temperature!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p",
               f"must be in (0, 1], got {self.top_p!r}")
        _check(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "top_k",
               f"must be -1 (off) or an integer >= 1, got {self.top_k!r}")
        _check(self.seed is None or _is_int(self.seed), "seed", f"must be an integer or None, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               f"must be non-empty strings, got {self.stop!r}")
        _check(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               f"must be non-negative integers, got {self.stop_token_ids!r}")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", f"must be a bool, got {self.ignore_eos!r}")
        self._check_constraint()

    def _check_constraint(self) -> None:
        object.__setattr__(self, "json_schema", constraints.schema_text(self.json_schema))
        object.__setattr__(self, "choice", constraints.choice_tuple(self.choice))
        given = [name for name in constraints.CONSTRAINT_FIELDS if getattr(self, name) is not None]
        _check(len(given) <= 1, ", ".join(given), "give at most one of json_schema, regex, choice")
        if given:
            constraints.check(given[0], getattr(self, given[0]))

    @property
    def constraint(self) -> tuple[str, str | tuple[str, ...]] | None:
        """(field name, canonical value) of the completion's constraint, or None."""
        for name in constraints.CONSTRAINT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                return name, value
        return None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class EngineConfig:
    """How the engine runs.  Every field has a default that suits the device.

    kv_cache_fraction: share of the device memory still free after the weights
        are loaded that the paged KV pool takes (CUDA).
    kv_cache_bytes: a fixed KV pool size in bytes; required on the CPU, where
        free memory is not a meaningful bound (default 256 MiB there).
    page_size: tokens per KV page.
    max_num_batched_tokens: the token budget of one forward pass (decodes plus
        prefill chunks); None (the default) lets the engine choose it from the
        model's size (Engine._token_budget: 8192 for 8B, 16384 for 1B on CUDA).
    max_num_seqs: a cap on running requests (memory is the real bound); None
        (the default) lets the engine choose it from the model's size
        (Engine._max_num_seqs: 1024 for 8B, 512 for 1B on CUDA, 512 elsewhere).
        A cap below a call's request count leaves a tail of steps with only the
        last admitted requests in them (llama-8b skewed at scale 0.25, 532
        requests, on an H200: 194 steps and 6.96 s at 512, 119 steps and 6.68 s
        at 1024; 2026-12-06).  Decode steps of more rows than the largest CUDA
        graph (1024) run eagerly, bound by the host.
    prefix_sharing: build the global prefix tree and compute shared prefixes once.
    min_shared_tokens: a prefix is shared only if (fan-out - 1) * length, the
        prompt tokens it saves, reaches this.
    cuda_graphs: replay CUDA graphs for decode-only steps (CUDA with the Triton
        attention only; elsewhere ignored), which removes most of a decode step's
        launch overhead (measured on an H100: long-output 6.13 s -> 2.54 s), and
        for steps with prefill chunks of up to cuda_graph_max_tokens tokens.
    cuda_graph_max_tokens: the largest step with prefill chunks that replays a
        graph (mixed_graphs.py; capped by the token budget; below 64, such steps
        run eagerly).  Larger steps are bound by the GPU, not by their launches.
    decode_first: inside each prefix group, start the requests with the most
        decode per prompt token first (BatchLLM's decode-first reordering); False
        keeps the input order (an ablation in the benchmark).
    decode_reserve: the share of a running request's remaining max_tokens whose KV
        pages admission keeps free for it.  1.0 (the default) admits a request
        only when it can finish without taking another's pages, so a small pool
        costs concurrency, never recomputation; lower values admit more requests
        (useful when outputs usually stop well before max_tokens) and preempt the
        newest when the pool runs dry.
    jump_forward: structured output takes the tokens its grammar forces (keys,
        punctuation, the rest of an enum value) as one chunk, with no mask and no
        step of their own (jump_forward.py); False decodes them one a step.
    tensor_parallel_size: ranks (GPUs) the model is split over, Megatron-style
        (parallel.py): one process per rank, NCCL on CUDA (cuda:0..N-1 of the
        visible devices, from `device`'s index), gloo on the CPU.  Heads and the
        intermediate size must divide by it (KV heads may be fewer: replicated).
    tokenizer: a folder with the tokenizer files (or a GGUF file) to use instead of the model's own, as
        vLLM's `tokenizer=`: for a weights-only checkpoint (config and safetensors, as `save_pretrained`
        writes), or another revision's tokenizer.  None: the model's; where it has none, token-id prompts
        run and text prompts fail per row with an error naming the files it lacks.
    """

    dtype: str = "auto"
    device: str | None = None
    kv_cache_fraction: float = 0.85
    kv_cache_bytes: int | None = None
    page_size: int = 16
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    prefix_sharing: bool = True
    min_shared_tokens: int = 32
    attention_backend: str = "auto"
    progress: bool = False
    seed: int = 0
    cuda_graphs: bool = True
    cuda_graph_max_tokens: int = 4096
    decode_first: bool = True
    decode_reserve: float = 1.0
    jump_forward: bool = True
    tensor_parallel_size: int = 1
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tokenizer, os.PathLike):
            object.__setattr__(self, "tokenizer", os.fspath(self.tokenizer))
        _check(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        _check(self.device is None or isinstance(self.device, str), "device",
               f"must be a device string such as 'cpu' or 'cuda', got {self.device!r}")
        _check(_is_number(self.kv_cache_fraction) and 0 < self.kv_cache_fraction < 1, "kv_cache_fraction",
               f"must be in (0, 1), got {self.kv_cache_fraction!r}")
        _check(self.kv_cache_bytes is None or (_is_int(self.kv_cache_bytes) and self.kv_cache_bytes > 0),
               "kv_cache_bytes", f"must be a positive integer or None, got {self.kv_cache_bytes!r}")
        _check(_is_int(self.page_size) and self.page_size >= 1 and self.page_size & (self.page_size - 1) == 0,
               "page_size", f"must be a power of two, got {self.page_size!r}")
        _check(self.max_num_batched_tokens is None or
               (_is_int(self.max_num_batched_tokens) and self.max_num_batched_tokens >= 16),
               "max_num_batched_tokens", f"must be an integer >= 16 or None, got {self.max_num_batched_tokens!r}")
        _check(self.max_num_seqs is None or (_is_int(self.max_num_seqs) and self.max_num_seqs >= 1), "max_num_seqs",
               f"must be an integer >= 1 or None, got {self.max_num_seqs!r}")
        _check(isinstance(self.prefix_sharing, bool), "prefix_sharing", "must be a bool")
        _check(_is_int(self.min_shared_tokens) and self.min_shared_tokens >= 1, "min_shared_tokens",
               f"must be an integer >= 1, got {self.min_shared_tokens!r}")
        _check(self.attention_backend in ("auto", "torch", "triton"), "attention_backend",
               f"must be 'auto', 'torch' or 'triton', got {self.attention_backend!r}")
        _check(isinstance(self.cuda_graphs, bool), "cuda_graphs", f"must be a bool, got {self.cuda_graphs!r}")
        _check(_is_int(self.cuda_graph_max_tokens) and self.cuda_graph_max_tokens >= 0, "cuda_graph_max_tokens",
               f"must be an integer >= 0, got {self.cuda_graph_max_tokens!r}")
        _check(isinstance(self.decode_first, bool), "decode_first", f"must be a bool, got {self.decode_first!r}")
        _check(isinstance(self.jump_forward, bool), "jump_forward", f"must be a bool, got {self.jump_forward!r}")
        _check(_is_number(self.decode_reserve) and 0 <= self.decode_reserve <= 1, "decode_reserve",
               f"must be a number in [0, 1], got {self.decode_reserve!r}")
        _check(_is_int(self.tensor_parallel_size) and self.tensor_parallel_size >= 1, "tensor_parallel_size",
               f"must be an integer >= 1, got {self.tensor_parallel_size!r}")
        _check(self.tokenizer is None or (isinstance(self.tokenizer, str) and self.tokenizer.strip() != ""),
               "tokenizer", f"must be a path (a folder with tokenizer files, or a .gguf file) or None, "
               f"got {self.tokenizer!r}")
