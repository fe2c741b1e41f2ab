"""The global prefix tree of one batch: which prefixes are shared, and by whom.

We see every prompt before anything runs, so instead of an LRU cache that
guesses, we build the compressed prefix tree (radix tree) of the whole batch
and *choose* the shared prefixes explicitly (BatchLLM, section 3).

Construction: sort the prompts; a subtree of the trie is then a contiguous
run of the sorted list, and the tree's internal nodes are the "lcp-intervals"
of the adjacent longest-common-prefix array (Abouelhoda et al., 2004), found
with one stack pass.  Sorting and the LCPs run in C (list comparison, numpy),
so a batch of thousands of long prompts plans in milliseconds.

Choice: walking down from the root, a node becomes a shared prefix when the
prompt tokens it saves, (requests below it - 1) x (its length beyond the
nearest chosen ancestor), reach `min_shared_tokens`.  Chosen nodes nest, so a
request's context is [level-1 prefix][level-2 prefix]...[own suffix].

A request always keeps at least its last prompt token as its own suffix (the
tree is built over prompt[:-1]): the first output token needs that position's
logits, which only the request itself computes.

Pure Python and numpy: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SharedPrefix:
    """One level of shared context: tokens [start, end) of every prompt below it."""

    id: int
    parent: int | None  # the enclosing shared prefix, or None at the top level
    start: int
    tokens: tuple[int, ...]  # this level's own tokens (those after the parent's end)
    num_requests: int

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(frozen=True)
class PrefixPlan:
    """The shared prefixes of a batch (parents before children) and each request's deepest one."""

    prefixes: tuple[SharedPrefix, ...]
    request_prefix: tuple[int | None, ...]  # per request: its deepest shared prefix, or None

    def chain(self, request: int) -> list[int]:
        """The shared prefixes above a request, outermost first."""
        chain, node = [], self.request_prefix[request]
        while node is not None:
            chain.append(node)
            node = self.prefixes[node].parent
        return chain[::-1]

    def suffix_start(self, request: int) -> int:
        """Position of the request's first own (unshared) prompt token."""
        node = self.request_prefix[request]
        return 0 if node is None else self.prefixes[node].end

    def computed_prompt_tokens(self, prompt_lens: Sequence[int]) -> int:
        """Prompt tokens a run computes: each shared prefix once, plus every request's own suffix."""
        shared = sum(len(p.tokens) for p in self.prefixes)
        return shared + sum(n - self.suffix_start(i) for i, n in enumerate(prompt_lens))

    @classmethod
    def unshared(cls, num_requests: int) -> "PrefixPlan":
        """The plan with sharing off: every request computes its whole prompt."""
        return cls((), (None,) * num_requests)


@dataclass
class _Interval:
    """A trie node: the sorted prompts [lo, hi] all share their first `depth` tokens."""

    depth: int
    lo: int
    hi: int
    parent: "_Interval | None" = None
    chosen_id: int | None = None


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _lcp_intervals(keys: list[np.ndarray]) -> list[_Interval]:
    """All lcp-intervals (depth >= 1, two or more prompts) of sorted `keys`, parents before children."""
    found: list[_Interval] = []
    stack = [_Interval(0, 0, -1)]
    for i in range(1, len(keys) + 1):
        depth = _lcp(keys[i - 1], keys[i]) if i < len(keys) else 0
        lo = i - 1
        while depth < stack[-1].depth:
            top = stack.pop()
            top.hi = i - 1
            found.append(top)
            lo = top.lo
        if depth > stack[-1].depth:
            stack.append(_Interval(depth, lo, -1))
    found.sort(key=lambda iv: (iv.lo, -iv.hi))  # pre-order: an enclosing interval sorts first
    _link_parents(found)
    return found


def _link_parents(intervals: list[_Interval]) -> None:
    open_: list[_Interval] = []
    for iv in intervals:
        while open_ and open_[-1].hi < iv.lo:
            open_.pop()
        iv.parent = open_[-1] if open_ else None
        open_.append(iv)


def _nearest_chosen(iv: _Interval | None) -> _Interval | None:
    while iv is not None and iv.chosen_id is None:
        iv = iv.parent
    return iv


def sort_key(ids: np.ndarray) -> bytes:
    """Bytes that order as the int64 id sequence orders lexicographically (a shorter prefix first).

    Big-endian words with the sign bit flipped compare, byte by byte, as the signed ids do: the sort of a
    batch's prompts is then memcmp over bytes, not Python's element-by-element comparison of lists (which
    walks the thousands of tokens that prompts below one shared prefix have in common at every comparison).
    """
    return (ids.view(np.uint64) ^ np.uint64(1 << 63)).astype(">u8").tobytes()


def build_prefix_plan(prompts: Sequence[Sequence[int]], min_shared_tokens: int = 32) -> PrefixPlan:
    """Choose the shared prefixes of a batch of token-id prompts (each at least one token long; an int64
    array, as `PreparedPrompt` holds them, is read in place)."""
    keys = [np.asarray(p[:-1], dtype=np.int64) for p in prompts]
    order = sorted(range(len(prompts)), key=[sort_key(k) for k in keys].__getitem__)
    sorted_keys = [keys[i] for i in order]
    prefixes: list[SharedPrefix] = []
    spans: list[tuple[int, int]] = []  # sorted positions below each chosen prefix
    for iv in _lcp_intervals(sorted_keys):
        anchor = _nearest_chosen(iv.parent)
        start = anchor.depth if anchor else 0
        count = iv.hi - iv.lo + 1
        if (count - 1) * (iv.depth - start) < min_shared_tokens:
            continue
        iv.chosen_id = len(prefixes)
        tokens = tuple(sorted_keys[iv.lo][start:iv.depth].tolist())  # Python ints, in one C call
        prefixes.append(SharedPrefix(iv.chosen_id, anchor.chosen_id if anchor else None, start, tokens, count))
        spans.append((iv.lo, iv.hi))
    # Pre-order: a deeper chosen prefix overwrites its ancestors for the requests below it.
    request_prefix: list[int | None] = [None] * len(prompts)
    for prefix_id, (lo, hi) in enumerate(spans):
        for k in range(lo, hi + 1):
            request_prefix[order[k]] = prefix_id
    return PrefixPlan(tuple(prefixes), tuple(request_prefix))
