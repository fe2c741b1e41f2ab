"""Token sampling (greedy, temperature, top-k, top-p, per-request seeds) and stop checks.

Sampling is the Gumbel-max trick: argmax(logits / T + g) with g = -log(-log(u))
is a sample of softmax(logits / T).  The uniforms u come from a counter-based
hash of (seed, step, vocabulary index) computed with int64 tensor ops, not
from a stateful generator, so a request's token depends only on its logits,
its own seed and its step: the same whatever else is in the batch, in
whatever order, on CPU or GPU (up to the last-ulp of float32 `log` between
devices, which moves a token only on an exact near-tie).

Stops are checked per request after each token (`StopChecker`); stop strings
are looked for in the decoded text of the last few tokens only.

A grammar's token mask (structured.py) is applied to the logits before `sample`
by `apply_token_mask`, for greedy and sampled rows alike: a masked token gets
-inf, so neither argmax nor the Gumbel-max sample can pick it, and the numerics
of the allowed tokens are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from .config import SamplingParams

_MASK64 = (1 << 64) - 1
# Below this, logits / temperature can overflow float32; the limit is greedy anyway.
MIN_TEMPERATURE = 1e-5


def _i64(value: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)


@dataclass(frozen=True)
class SamplingBatch:
    """Per-row sampling settings for R rows, as device tensors.

    A row is greedy when its temperature is below `MIN_TEMPERATURE` (0 included)
    or its top_k is 1.  `all_greedy` and `any_filter` are host flags so that
    `sample` skips work without a device sync.
    """

    temperature: Tensor  # [R] float32
    top_p: Tensor  # [R] float32
    top_k: Tensor  # [R] int64, <= 0 means off
    seed: Tensor  # [R] int64
    step: Tensor  # [R] int64, index of the completion token being sampled
    greedy: Tensor  # [R] bool
    all_greedy: bool
    any_filter: bool

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], steps: list[int],
              device: torch.device | str = "cpu") -> "SamplingBatch":
        if not len(params) == len(seeds) == len(steps):
            raise ValueError(f"params, seeds, steps differ in length: {len(params)}, {len(seeds)}, {len(steps)}")
        greedy = [p.greedy or p.temperature < MIN_TEMPERATURE for p in params]
        as_t = lambda xs, dtype: torch.tensor(xs, dtype=dtype, device=device)  # noqa: E731
        return cls(
            temperature=as_t([p.temperature for p in params], torch.float32),
            top_p=as_t([p.top_p for p in params], torch.float32),
            top_k=as_t([p.top_k for p in params], torch.int64),
            seed=as_t([_i64(s & _MASK64) for s in seeds], torch.int64),
            step=as_t(steps, torch.int64),
            greedy=as_t(greedy, torch.bool),
            all_greedy=all(greedy),
            any_filter=any(not g and (p.top_k > 0 or p.top_p < 1) for p, g in zip(params, greedy)),
        )


def sampling_row(params: SamplingParams, seed: int) -> tuple:
    """(temperature, top_p, top_k, seed as int64, greedy, filters) of one request, computed once per request."""
    greedy = params.greedy or params.temperature < MIN_TEMPERATURE
    filters = not greedy and (params.top_k > 0 or params.top_p < 1)
    return params.temperature, params.top_p, params.top_k, _i64(seed & _MASK64), greedy, filters


def _srl(x: Tensor, shift: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> shift) & ((1 << (64 - shift)) - 1)


def _mix64(x: Tensor) -> Tensor:
    """splitmix64's finaliser: a bijection of 64-bit words with full avalanche (wrapping int64 ops)."""
    x = (x ^ _srl(x, 30)) * _MIX1
    x = (x ^ _srl(x, 27)) * _MIX2
    return x ^ _srl(x, 31)


def hash_uniform(seed: Tensor, step: Tensor, vocab_size: int) -> Tensor:
    """Uniforms in (0, 1), [R, V] float32, a pure function of (seed[r], step[r], column)."""
    row_key = _mix64(_mix64(seed + _GOLDEN) + step * _GOLDEN)  # [R]
    cols = torch.arange(1, vocab_size + 1, dtype=torch.int64, device=seed.device)
    bits = _mix64(row_key[:, None] + cols[None, :] * _GOLDEN)  # splitmix64 stream: [R, V]
    # Top 24 bits, centred in their bin: exact in float32 and never 0 or 1.
    return (_srl(bits, 40).float() + 0.5) * (1.0 / (1 << 24))


def _filter_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Set logits outside each row's top-k and nucleus (top-p) to -inf; the best token always stays.

    Ranks come from a stable descending sort, so ties are broken by token id
    and the kept set is exactly top_k tokens.
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)  # [R, V]
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, vocab)[:, None]
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the better-ranked tokens
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)
    drop[:, 0] = False
    keep_sorted = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, keep_sorted)


def sample(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Next tokens [R] int64 from logits [R, V] (any float dtype: the temperature's division is in float32)."""
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens
    # Greedy rows get temperature 1 here only to stay finite; their result is discarded below.
    temperature = torch.where(batch.greedy, 1.0, batch.temperature)
    scaled = logits.float() / temperature[:, None]
    if batch.any_filter:
        scaled = _filter_top_k_top_p(scaled, batch.top_k, batch.top_p)
    gumbel = -torch.log(-torch.log(hash_uniform(batch.seed, batch.step, logits.shape[-1])))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(batch.greedy, greedy_tokens, sampled)


def apply_token_mask(logits: Tensor, mask: Tensor) -> Tensor:
    """logits [R, V] with each token whose bit is 0 in `mask` set to -inf (a new tensor).

    mask: [R, ceil(V / 32)] int32 on the logits' device; bit j of word w allows token
    32 * w + j.  Read as bytes (little-endian, as on every device torch runs on), bit k
    of byte b is token 8 * b + k.
    """
    rows, vocab = logits.shape
    if mask.shape != (rows, (vocab + 31) // 32) or mask.dtype != torch.int32:
        raise ValueError(f"mask must be int32 [{rows}, {(vocab + 31) // 32}], got {mask.dtype} {tuple(mask.shape)}")
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    allowed = (mask.view(torch.uint8).unsqueeze(-1) >> shifts) & 1  # [R, 4 * words, 8]
    return logits.masked_fill(allowed.view(rows, -1)[:, :vocab] == 0, float("-inf"))


# ---------------------------------------------------------------------------------------------- stops


@dataclass(frozen=True)
class StopDecision:
    """Whether a request is finished after its newest token, and if so why and with what text.

    reason: "stop" (EOS, a stop token or a stop string), "length" (max_tokens), None (running).
    text: the completion text when finished (special tokens skipped, a stop string and what
        follows removed); "" while running, to avoid decoding every step.
    matched: the stop string or token id that ended it (None otherwise).
    """

    finished: bool
    reason: str | None = None
    text: str = ""
    matched: str | int | None = None


RUNNING = StopDecision(False)


class StopChecker:
    """Decides, after each new token of a request, whether it is finished.

    Stateless: `check` is given the completion's token ids so far and must be
    called after every token (a stop string is looked for only in the text of
    the last few tokens).  Checked in order: EOS (unless ignore_eos),
    stop_token_ids, stop strings, the end of the request's grammar (structured
    output: nothing may follow, reason "stop"), max_tokens.  The token that triggered a stop
    stays in the token ids, as HF `generate` keeps EOS; its text is dropped only
    where it is a special token.
    """

    def __init__(self, tokenizer: Any, eos_token_ids: Iterable[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)

    def check(self, token_ids: Sequence[int], params: SamplingParams, grammar_ended: bool = False) -> StopDecision:
        """The decision after `token_ids[-1]` (the completion's tokens, prompt excluded).

        grammar_ended: the request's constraint is complete with this token (structured.py).
        """
        last = token_ids[-1]
        if last in self.eos_token_ids and not params.ignore_eos:
            return StopDecision(True, "stop", self.decode(token_ids), last)
        if last in params.stop_token_ids:
            return StopDecision(True, "stop", self.decode(token_ids), last)
        if params.stop:
            decision = self._check_stop_strings(token_ids, params.stop)
            if decision.finished:
                return decision
        if grammar_ended:
            return StopDecision(True, "stop", self.decode(token_ids))
        if len(token_ids) >= params.max_tokens:
            return StopDecision(True, "length", self.decode(token_ids))
        return RUNNING

    def decode(self, token_ids: Sequence[int]) -> str | None:
        """The text of `token_ids`; None without a tokenizer (a weights-only checkpoint: the ids are the output).

        The ids go as an int64 array: transformers turns an array into a list with one `tolist`, where it
        checks a list's elements one by one in Python (a completion's text is decoded once, at its end).
        """
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(np.asarray(token_ids, dtype=np.int64), skip_special_tokens=True)

    def _check_stop_strings(self, token_ids: Sequence[int], stops: tuple[str, ...]) -> StopDecision:
        # Any stop string completed by the newest token lies in the text of the last few
        # tokens; a character may take up to 4 byte tokens, and 8 more absorb tokens that
        # decode to nothing.  Earlier occurrences were caught when they were completed.
        window = 4 * max(map(len, stops)) + 8
        tail = self.decode(token_ids[-window:])
        if not any(stop in tail for stop in stops):
            return RUNNING
        text = self.decode(token_ids)
        hits = [(i, stop) for stop in stops if (i := text.find(stop)) >= 0]
        if not hits:  # the window's decode differed from the whole one (a tokenizer's spacing rule)
            return RUNNING
        index, stop = min(hits)
        return StopDecision(True, "stop", text[:index], stop)
