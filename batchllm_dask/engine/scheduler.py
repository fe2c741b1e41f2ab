"""What runs in each forward pass.  Pure Python over request metadata: no torch.

Two separate pieces (DESIGN.md):

- *Order* (`order_requests`): prefix groups depth-first, so a shared prefix's
  KV lives as briefly as possible; inside each group, decode-first (larger
  max_tokens / own-prompt ratio first, BatchLLM section 4.1), so long
  generations start early and their decode tokens ride along with later
  prefill chunks.
- *Admission and token batching* (`Scheduler`): a request is admitted, in
  order, when its own prompt, plus any shared prefix above it not yet in
  memory, plus a reserve for the decode growth it may still have
  (`decode_reserve` x its remaining max_tokens), fits in the pages that are free
  and not reserved by the requests already running: memory, not a count,
  bounds concurrency.  With the default full reserve every admitted request
  can finish without taking a page from another, so a scarce pool costs
  concurrency, never recomputation.  Each step carries every running decode
  plus prefill chunks up to a token budget.  Decode pages are taken as tokens
  arrive; if the pool runs dry anyway (a reserve below 1), the newest request
  is preempted (its pages freed) and recomputed later from its prompt and the
  tokens it had generated: nothing is lost.

The engine runs one step ahead of the host's knowledge of sampled tokens
(engine.py): a request whose newest token is still on the device carries a
placeholder (`unresolved`), which a decode feeds from the device; a request
whose last token is in flight is DRAINING and gets no more steps.  A preempted
request is re-admitted only once its tokens are all known.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property, partial
from itertools import repeat
from operator import attrgetter
from typing import NamedTuple

import numpy as np

from .kv_cache import PageAllocator, kv_shortage_message, pages_for
from .prefix_tree import PrefixPlan
from .request_table import RequestTable
from .sequence import PrefixSeq, RequestSeq, Sequence, Status


def order_requests(plan: PrefixPlan, decode_ratio: list[float]) -> list[int]:
    """Request indices in run order: prefix groups depth-first, decode-first inside each group."""
    children: dict[int | None, list[int]] = {}
    for p in plan.prefixes:
        children.setdefault(p.parent, []).append(p.id)
    direct: dict[int | None, list[int]] = {}
    for i, node in enumerate(plan.request_prefix):
        direct.setdefault(node, []).append(i)
    order: list[int] = []

    def visit(node: int | None) -> None:
        order.extend(sorted(direct.get(node, []), key=lambda i: (-decode_ratio[i], i)))
        for child in children.get(node, []):
            visit(child)

    visit(None)
    return order


class Chunk(NamedTuple):
    """`length` tokens of `seq`, from token index `start`, computed in this step."""

    seq: Sequence
    start: int
    length: int

    @property
    def samples(self) -> bool:
        """Whether this chunk ends a request's pending tokens, so its last row is sampled."""
        return type(self.seq) is RequestSeq and self.start + self.length == len(self.seq.tokens)


@dataclass(frozen=True)
class StepBatch:
    """One forward pass: decodes (one token each), then prefill chunks."""

    decodes: list[Chunk]
    prefills: list[Chunk]
    table: RequestTable  # the running requests' columns, which the step inputs gather from
    decode_slots: np.ndarray  # [len(decodes)] int64: each decode's request's table slot
    decode_starts: np.ndarray  # [len(decodes)] int64: each decode's token index (its chunk's start)
    failed: list[RequestSeq] = field(default_factory=list)  # requests that can never fit

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(c.length for c in self.prefills)

    @cached_property
    def sampled(self) -> list[Chunk]:
        """The chunks whose last row is sampled, in row order (computed once: the step inputs and the
        engine's launch both read it before the step's placeholders change the requests' lengths)."""
        return self.decodes + [c for c in self.prefills if c.samples]


class Scheduler:
    """Admission by KV memory with a decode reserve, token batches under a budget, preemption of the newest.

    decode_reserve: the share of each running request's remaining max_tokens whose pages admission keeps
    free for it (1.0: never preempt; 0.0: admit on the prompt alone and preempt when the pool runs dry).
    """

    def __init__(self, requests: list[RequestSeq], allocator: PageAllocator, page_size: int,
                 max_batched_tokens: int, max_running: int, decode_reserve: float = 1.0, page_bytes: int = 0,
                 step_sizes: tuple[int, ...] = ()):
        self.allocator = allocator
        self.step_sizes = step_sizes  # token counts a step with prefill chunks should have (`fit_step_size`)
        self.page_bytes = page_bytes  # for error messages only
        self.page_size = page_size
        self.max_batched_tokens = max_batched_tokens
        self.max_running = min(max_running, max_batched_tokens)
        self.decode_reserve = decode_reserve
        self.waiting: deque[RequestSeq] = deque(requests)
        self.running: dict[int, RequestSeq] = {}  # id -> request, in admission order: the last is the newest
        self.prefilling: list[Sequence] = []  # prefixes and requests with prompt tokens to compute, admitted order
        self.table = RequestTable(self.max_running)  # a slot per running request (at most max_running run)
        self._slots: np.ndarray | None = None  # the running requests' slots in admission order (None: to gather)
        self.reserved = 0  # pages set aside for the running requests' decode growth
        self.num_preemptions = 0
        self.recomputed_tokens = 0

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> StepBatch:
        decodes, slots, starts = self._schedule_decodes()
        budget = self.max_batched_tokens - len(decodes)
        prefills, budget = self._continue_prefills(budget)
        new, failed = self._admit(budget)
        prefills = fit_step_size(sorted(prefills + new, key=_row_key), len(decodes), self.step_sizes)
        return StepBatch(decodes, prefills, self.table, slots, starts, failed)

    def commit(self, batch: StepBatch) -> None:
        """Record that the batch runs: its tokens' KV will be in the pool, and each request it samples gets
        one token more (the caller appends it after this call: a placeholder, pipeline.py), so the table's
        count columns stay those of the requests."""
        table, slots = self.table, batch.decode_slots
        if len(slots):
            for seq in map(_seq, batch.decodes):
                seq.num_computed += 1
            table.computed[slots] += 1
            table.length[slots] += 1
        for chunk in batch.prefills:
            seq = chunk.seq
            seq.num_computed += chunk.length
            if type(seq) is RequestSeq:
                table.computed[seq.slot] = seq.num_computed
                if chunk.samples:
                    table.length[seq.slot] += 1
        if batch.prefills:
            self.prefilling = [p for p in self.prefilling if p.pending > 0]

    def extend(self, seq: RequestSeq) -> None:
        """Known tokens were appended to a running request (jump_forward.py: its grammar's forced run):
        pages for them, and a chunk in the next step, ahead of the prompts' prefill chunks (a decode-like
        request should not wait behind the budget).  The caller keeps the run within the request's own
        pages and reserve, so no other request is preempted for it."""
        if not self._grow(seq, len(seq.tokens)):
            raise RuntimeError("jump-forward outgrew the request's pages: this is a bug, please report it")
        self.table.length[seq.slot] = len(seq.tokens)
        if seq not in self.prefilling:
            self.prefilling.insert(0, seq)

    def finish(self, seq: RequestSeq) -> None:
        """Retire a request: free its pages, and any prefix whose last user it was.

        A request may also end while preempted (waiting), on a token that was still on the device.
        """
        if seq.status is Status.WAITING:
            self.waiting.remove(seq)
        else:
            del self.running[id(seq)]
            self._slots = None
            self._release(seq)
        seq.status = Status.FINISHED
        for prefix in seq.ancestors():
            prefix.users -= 1
            if prefix.users == 0:
                self._free(prefix)

    # -- pieces ----------------------------------------------------------------------------
    def _schedule_decodes(self) -> tuple[list[Chunk], np.ndarray, np.ndarray]:
        """Every running decode in rank order, up to the token budget (after an out-of-memory retry halved
        the budget, engine.py, the rest wait a step rather than the step staying too large); their table
        slots and token indices.

        The running requests are taken in admission order.  Which of them decode (`_decodes`, and RUNNING,
        not DRAINING) is a test over the table's columns; most have room for the new token in their last
        page.  The few that need one get it at once when the pool has a page for each and the budget
        takes them all; else they take pages one by one in that order (`_taken`), which may preempt the
        newest requests.
        """
        table = self.table
        slots = self._running_slots()
        length, computed = table.length[slots], table.computed[slots]
        pick = np.flatnonzero((length - computed == 1) & (length > table.num_prompt[slots]) & ~table.draining[slots])
        slots, computed = slots[pick], computed[pick]
        full = np.flatnonzero(table.num_pages[slots] * self.page_size <= computed)
        if len(slots) > self.max_batched_tokens or len(full) > self.allocator.num_free:
            keep = self._taken(table.seqs[slots].tolist(), computed, full)
            slots, computed = slots[keep], computed[keep]
        elif len(full):
            self._grow_by_one(slots[full])
        ranks = table.rank[slots]
        if len(ranks) > 1 and not (ranks[1:] > ranks[:-1]).all():  # a re-admitted request is out of rank order
            order = np.argsort(ranks, kind="stable")
            slots, computed = slots[order], computed[order]
        chunks = list(map(_new_chunk, zip(table.seqs[slots].tolist(), computed.tolist(), repeat(1))))
        return chunks, slots, computed

    def _taken(self, seqs: list[RequestSeq], computed: np.ndarray, full: np.ndarray) -> np.ndarray:
        """Which of the decodes `seqs` (admission order, tokens at `computed`) the step takes: in order, up to
        the token budget, those at `full` if `_grow` gives them a page.  A page taken may preempt the newest
        requests, later in `seqs`: after a preemption, the ones left are taken only if still running."""
        keep = np.zeros(len(seqs), dtype=bool)
        limit, taken, begin, preemptions = self.max_batched_tokens, 0, 0, self.num_preemptions
        for end in [*full.tolist(), len(seqs)]:
            room = range(begin, end)  # these have room in their pages
            if self.num_preemptions != preemptions:
                room = [i for i in room if seqs[i].status is Status.RUNNING]
            room = room[:limit - taken]
            keep[room] = True
            taken += len(room)
            if taken >= limit or end == len(seqs):
                break
            seq = seqs[end]
            if seq.status is Status.RUNNING and self._grow(seq, int(computed[end]) + 1):
                keep[end] = True
                taken += 1
            begin = end + 1
        return keep

    def _grow_by_one(self, slots: np.ndarray) -> None:
        """One new page for each request in `slots` (distinct; the pool has them), in their order: the pages
        `_grow` would give them one by one (no preemption)."""
        pages = self.allocator.allocate(len(slots))
        self.table.add_pages(slots, pages)
        for seq, page in zip(self.table.seqs[slots].tolist(), pages):
            seq.pages.append(page)
            if seq.reserved_pages > 0:
                seq.reserved_pages -= 1
                self.reserved -= 1

    def _running_slots(self) -> np.ndarray:
        """The running requests' table slots, in admission order (gathered again after a change)."""
        if self._slots is None:
            self._slots = np.fromiter(map(_slot, self.running.values()), dtype=np.int64, count=len(self.running))
        return self._slots

    def _grow(self, seq: RequestSeq, num_tokens: int) -> bool:
        """Give `seq` pages for `num_tokens`, preempting newer requests if the pool is dry."""
        while len(seq.pages) < pages_for(num_tokens, self.page_size):
            if self.allocator.num_free == 0:
                victim = self._newest_running()
                if victim is None:
                    return False
                self._preempt(victim)
                if victim is seq:
                    return False
                continue
            page = self.allocator.allocate(1)[0]
            seq.pages.append(page)
            self.table.add_page(seq, page)
            if seq.reserved_pages > 0:
                seq.reserved_pages -= 1
                self.reserved -= 1
        return True

    def _newest_running(self) -> RequestSeq | None:
        """The newest request that can be preempted (a DRAINING one ends within a step anyway)."""
        return next((s for s in reversed(self.running.values()) if s.status is Status.RUNNING), None)

    def _preempt(self, seq: RequestSeq) -> None:
        self.num_preemptions += 1
        self.recomputed_tokens += seq.num_computed
        del self.running[id(seq)]
        self._slots = None
        if seq in self.prefilling:
            self.prefilling.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _continue_prefills(self, budget: int) -> tuple[list[Chunk], int]:
        chunks = []
        for seq in self.prefilling:
            if budget <= 0:
                break
            if seq.pending > 0 and seq.context_ready() and not _decodes(seq):
                chunk = Chunk(seq, seq.num_computed, min(seq.pending, budget))
                chunks.append(chunk)
                budget -= chunk.length
        return chunks, budget

    def _admit(self, budget: int) -> tuple[list[Chunk], list[RequestSeq]]:
        chunks: list[Chunk] = []
        failed: list[RequestSeq] = []
        while self.waiting and len(self.running) < min(self.max_running, self.max_batched_tokens):
            seq = self.waiting[0]
            if seq.unresolved:  # preempted while its newest token was on the device: wait for it
                break
            need = self._pages_needed(seq)
            if need > self._available() and not self.running:
                self._release_idle_prefixes()
                need = self._pages_needed(seq)
                if need > self._available():
                    failed.append(self._fail(seq, need))
                    continue
            if need > self._available() or budget <= 0:
                break
            new_prefixes = self._materialize(seq)
            self.waiting.popleft()
            seq.pages = self.allocator.allocate(pages_for(len(seq.tokens), self.page_size))
            self.table.admit(seq)
            seq.reserved_pages = self._growth_reserve(seq)
            self.reserved += seq.reserved_pages
            seq.status = Status.RUNNING
            self.running[id(seq)] = seq
            self._slots = None
            self.prefilling.append(seq)
            for s in [*new_prefixes, seq]:
                if budget > 0 and _parent_done(s) and s.pending > 0 and (s is not seq or s.context_ready()):
                    chunks.append(Chunk(s, s.num_computed, min(s.pending, budget)))
                    budget -= chunks[-1].length
        return chunks, failed

    def _available(self) -> int:
        """Pages an admission may take: free and not reserved for the running requests' growth."""
        return self.allocator.num_free - self.reserved

    def _growth_reserve(self, seq: RequestSeq) -> int:
        """Pages to keep for `seq`'s future tokens: decode_reserve of its remaining growth."""
        growth = pages_for(len(seq.tokens) + seq.remaining, self.page_size) - pages_for(len(seq.tokens), self.page_size)
        return -(-int(growth * self.decode_reserve * 1000) // 1000)  # ceil, robust to float rounding

    def _pages_needed(self, seq: RequestSeq) -> int:
        own = pages_for(len(seq.tokens), self.page_size) + self._growth_reserve(seq)
        missing = [p for p in seq.ancestors() if not p.materialized]
        return own + sum(pages_for(len(p.tokens), self.page_size) for p in missing)

    def _materialize(self, seq: RequestSeq) -> list[PrefixSeq]:
        new = [p for p in seq.ancestors() if not p.materialized]
        for prefix in new:
            prefix.pages = self.allocator.allocate(pages_for(len(prefix.tokens), self.page_size))
            prefix.num_computed = 0
            prefix.status = Status.RUNNING
            self.prefilling.append(prefix)
        return new

    def _release_idle_prefixes(self) -> None:
        """Last resort when nothing runs and the next request does not fit: free prefixes held for
        waiting requests only (they are recomputed when needed again)."""
        held = {id(p): p for s in self.waiting for p in s.ancestors() if p.materialized}
        for prefix in held.values():
            self.recomputed_tokens += prefix.num_computed
            self._free(prefix)
            prefix.num_computed = 0
        self.prefilling = [p for p in self.prefilling if p.materialized or isinstance(p, RequestSeq)]

    def _fail(self, seq: RequestSeq, need: int) -> RequestSeq:
        self.waiting.popleft()
        seq.status = Status.FINISHED
        seq.finish_reason = "error"
        seq.error = kv_shortage_message(need, self.allocator.num_pages, self.page_bytes)
        for prefix in seq.ancestors():
            prefix.users -= 1
            if prefix.users == 0:
                self._free(prefix)
        return seq

    def _release(self, seq: RequestSeq) -> None:
        """Free a request's pages and give back what was reserved for it."""
        self.reserved -= seq.reserved_pages
        seq.reserved_pages = 0
        self.table.release(seq)
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.allocator.free(seq.pages)
        seq.pages = []


def fit_step_size(prefills: list[Chunk], num_decodes: int, sizes: tuple[int, ...]) -> list[Chunk]:
    """The step's prefill chunks, the last ones shortened where that brings the step to one of `sizes` tokens.

    A step of up to sizes[-1] tokens replays a CUDA graph of the next size up (mixed_graphs.py), its extra
    rows padding.  Cutting the last chunks down to the size below instead moves those tokens to the next
    step: the same work, none wasted.  It is done only where it costs less than the padding would and
    keeps most of what could be cut: else a short prompt beside many decodes would trickle in a token a
    step, cut again at every step.  Each chunk keeps at least one token, so what the scheduler decided
    about admission and order stands.
    """
    total = num_decodes + sum(c.length for c in prefills)
    if not prefills or not sizes or total > sizes[-1]:
        return prefills
    i = bisect.bisect_right(sizes, total) - 1
    if i >= 0 and sizes[i] == total:
        return prefills
    cut, pad = total - sizes[i] if i >= 0 else total, sizes[i + 1] - total
    if i < 0 or sizes[i] <= num_decodes or cut >= pad or 2 * cut > sum(c.length - 1 for c in prefills):
        return prefills
    fitted = list(prefills)
    for j in range(len(fitted) - 1, -1, -1):
        chunk = fitted[j]
        take = min(cut, chunk.length - 1)
        if take:
            fitted[j] = Chunk(chunk.seq, chunk.start, chunk.length - take)
            cut -= take
        if not cut:
            break
    return fitted


def _decodes(seq: Sequence) -> bool:
    """Whether the decode pass takes `seq` (one pending token after generated ones), not the prefill pass.

    A recomputed request whose last prefill chunk leaves one token looks like a decode (so does a forced
    run of jump_forward.py cut down to its last token): only one pass may take that token, or it is computed
    and sampled twice in one step.  `_schedule_decodes` tests the same condition over the table's columns."""
    return type(seq) is RequestSeq and seq.pending == 1 and len(seq.tokens) > seq.num_prompt


def _parent_done(seq: Sequence) -> bool:
    return seq.parent is None or (seq.parent.pending == 0 and seq.parent.materialized)


_new_chunk = partial(tuple.__new__, Chunk)  # Chunk((seq, start, length)) without NamedTuple's Python __new__
_seq = attrgetter("seq")
_slot = attrgetter("slot")


def _row_key(chunk: Chunk) -> tuple[int, int]:
    # Prefixes sort just before the requests below them; rows of one group stay contiguous.
    return (chunk.seq.rank, 0 if isinstance(chunk.seq, PrefixSeq) else 1)
