"""Numpy columns the scheduler keeps per running request, so a step's inputs are gathers, not a pass per row.

Every admitted request holds a *slot*, one row of the table, until it is released (finished or
preempted).  A row keeps what a step's inputs read about the request and what changes rarely:

- static settings, written once at admission: the request itself, its rank, the absolute position of its
  first token, its prompt length, and its sampling settings (`RequestSeq.sampling_row`);
- whether its newest token is its last (DRAINING: `pipeline.mark_sampled` sets it with the status);
- its token count and computed count (`len(seq.tokens)`, `seq.num_computed`), kept equal to the request's
  by the scheduler (admission, `Scheduler.commit`, `Scheduler.extend`), so that the decode pass is a
  test over columns, not a walk over the running requests;
- its KV page ids, a row of the page table, written as the scheduler allocates them (admission, one
  new page a decode at a time) and dropped when it frees them.

The scheduler is the only code that gives a request pages or takes them away, so the page table is
always the requests' `pages` lists as arrays.  Likewise it is the only code that computes a request's
tokens, and a step's caller appends exactly one token (a placeholder, pipeline.py) to each sampled
request after `commit`: the count columns follow.  step_inputs.py gathers the decode rows' positions, KV
slots, page lists and sampling settings from here by slot (`StepBatch.table`).
"""
from __future__ import annotations

import numpy as np

from .sequence import RequestSeq

_INITIAL_WIDTH = 64  # page-table columns at first; doubled when a request needs more


class RequestTable:
    """Rows of running requests: static columns and a page table, indexed by `RequestSeq.slot`."""

    def __init__(self, num_slots: int):
        self.free_slots = list(range(num_slots - 1, -1, -1))  # pop() hands out low slots first
        self.seqs = np.full(num_slots, None, dtype=object)  # the request in each slot (None: free)
        self.rank = np.zeros(num_slots, dtype=np.int64)
        self.length = np.zeros(num_slots, dtype=np.int64)  # len(seq.tokens)
        self.computed = np.zeros(num_slots, dtype=np.int64)  # seq.num_computed
        self.draining = np.zeros(num_slots, dtype=bool)  # seq.status is DRAINING
        self.start = np.zeros(num_slots, dtype=np.int64)
        self.num_prompt = np.zeros(num_slots, dtype=np.int64)
        self.temperature = np.zeros(num_slots, dtype=np.float32)
        self.top_p = np.zeros(num_slots, dtype=np.float32)
        self.top_k = np.zeros(num_slots, dtype=np.int64)
        self.seed = np.zeros(num_slots, dtype=np.int64)
        self.greedy = np.zeros(num_slots, dtype=np.uint8)
        self.filters = np.zeros(num_slots, dtype=bool)
        self.num_pages = np.zeros(num_slots, dtype=np.int64)
        self.pages = np.zeros((num_slots, _INITIAL_WIDTH), dtype=np.int32)

    def admit(self, seq: RequestSeq) -> None:
        """Give `seq` a slot and write its row (its pages: the list it was just allocated)."""
        slot = seq.slot = self.free_slots.pop()
        seq.table = self
        self.seqs[slot], self.rank[slot] = seq, seq.rank
        self.start[slot], self.num_prompt[slot] = seq.start, seq.num_prompt
        self.length[slot], self.computed[slot] = len(seq.tokens), seq.num_computed
        self.draining[slot] = False
        if seq.sampling_row:  # (a request made without one, in a scheduler-only test, is never sampled)
            temperature, top_p, top_k, seed, greedy, filters = seq.sampling_row
            self.temperature[slot], self.top_p[slot], self.top_k[slot] = temperature, top_p, top_k
            self.seed[slot], self.greedy[slot], self.filters[slot] = seed, greedy, filters
        self._fit(len(seq.pages))
        self.pages[slot, :len(seq.pages)] = seq.pages
        self.num_pages[slot] = len(seq.pages)

    def add_pages(self, slots: np.ndarray, pages: list[int]) -> None:
        """Record one page just appended to the `pages` of each request in `slots` (distinct slots)."""
        counts = self.num_pages[slots]
        self._fit(int(counts.max(initial=0)) + 1)
        self.pages[slots, counts] = pages
        self.num_pages[slots] = counts + 1

    def add_page(self, seq: RequestSeq, page: int) -> None:
        """Record a page just appended to `seq.pages`."""
        slot, n = seq.slot, int(self.num_pages[seq.slot])
        self._fit(n + 1)
        self.pages[slot, n] = page
        self.num_pages[slot] = n + 1

    def release(self, seq: RequestSeq) -> None:
        """Free `seq`'s slot (its pages were freed)."""
        self.num_pages[seq.slot] = 0
        self.seqs[seq.slot] = None
        self.free_slots.append(seq.slot)
        seq.slot, seq.table = -1, None

    def page_lists(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the page ids of every slot in `slots`, concatenated in that order; each one's count)."""
        counts = self.num_pages[slots]
        width = int(counts.max(initial=0))
        block = self.pages[slots, :width]
        return block[np.arange(width) < counts[:, None]], counts

    def _fit(self, num_pages: int) -> None:
        """Widen the page table to hold `num_pages` pages per row."""
        width = self.pages.shape[1]
        if num_pages > width:
            wider = np.zeros((len(self.pages), max(num_pages, 2 * width)), dtype=np.int32)
            wider[:, :width] = self.pages
            self.pages = wider
