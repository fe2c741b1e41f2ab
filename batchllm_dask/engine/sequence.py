"""The state of one thing whose KV the engine computes: a shared prefix or a request.

Both are a run of tokens at absolute positions [start, start + len(tokens)),
stored in their own KV pages, below an optional parent prefix whose KV they
attend to.  A request's tokens are its own prompt suffix followed by what it
has generated so far; a prefix never generates.  Pure Python: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from .config import SamplingParams

if TYPE_CHECKING:
    from .request_table import RequestTable


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    DRAINING = "draining"  # its last token is being sampled on the device: no more steps, pages held until then
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """KV-owning state.  `num_computed` tokens of `tokens` have their KV in `pages`."""

    start: int  # absolute position of tokens[0]
    tokens: list[int]
    parent: "Sequence | None"  # the deepest shared prefix above, or None
    rank: int  # order of the request in the plan; rows of a step are sorted by it
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: Status = Status.WAITING
    reserved_pages: int = 0  # pages admission set aside for its future decode growth, not yet allocated
    _chain: "tuple[Sequence, ...] | None" = field(default=None, init=False, repr=False)
    # (the `pages` list, its ids as an array) kept by step_inputs.page_array between steps
    page_cache: tuple | None = field(default=None, init=False, repr=False)

    @property
    def pending(self) -> int:
        """Tokens whose KV is not computed yet."""
        return len(self.tokens) - self.num_computed

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def ancestors(self) -> "tuple[Sequence, ...]":
        """Shared prefixes above, outermost first (the tree does not change: computed once)."""
        if self._chain is None:
            chain, node = [], self.parent
            while node is not None:
                chain.append(node)
                node = node.parent
            self._chain = tuple(chain[::-1])
        return self._chain

    def context_ready(self) -> bool:
        """Whether every prefix above has all its KV computed."""
        return all(p.pending == 0 and p.pages for p in self.ancestors())


@dataclass(eq=False)
class PrefixSeq(Sequence):
    """A shared prefix: prefilled once, freed when `users` (unfinished requests below) reaches 0."""

    prefix_id: int = -1
    users: int = 0

    @property
    def materialized(self) -> bool:
        return bool(self.pages)


@dataclass(eq=False)
class RequestSeq(Sequence):
    """A request: its prompt suffix, then its generated tokens."""

    index: int = -1  # position in the caller's list
    params: SamplingParams = field(default_factory=SamplingParams)
    seed: int = 0
    num_prompt: int = 0  # length of the own prompt suffix
    num_cached: int = 0  # prompt tokens of shared prefixes that an earlier request computed
    finish_reason: str | None = None
    error: str | None = None
    text: str | None = None  # the completion's text once finished (None: decode it from the tokens)
    unresolved: int = 0  # tokens at the end of `tokens` that are still being sampled on the device (placeholders)
    feed_index: int = -1  # where its newest placeholder is in the sampled tokens of the step that samples it
    sampling_row: tuple = ()  # sampler.sampling_row(params, seed): what a step's sampling arrays take from it
    stop_ids: frozenset = frozenset()  # token ids that end it (EOS unless ignore_eos, stop_token_ids)
    slot: int = -1  # its row of the scheduler's RequestTable while admitted (request_table.py), else -1
    table: "RequestTable | None" = field(default=None, repr=False)  # that table while admitted, else None

    @property
    def output(self) -> list[int]:
        return self.tokens[self.num_prompt:]

    @property
    def remaining(self) -> int:
        """Tokens it may still generate."""
        return self.params.max_tokens - (len(self.tokens) - self.num_prompt)

    @property
    def decode_ratio(self) -> float:
        """BatchLLM's decode-first key: generated tokens per prompt token it must prefill."""
        return self.params.max_tokens / max(1, self.num_prompt)
