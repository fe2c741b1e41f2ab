"""A scheduled step as flat host arrays: token ids, positions, KV slots, the attention work list, sampling.

The runner copies these to the device in one transfer (runner.py); nothing
here touches torch.  Rows are packed decodes first, then prefill chunks, in
plan order, so the decode rows below one shared prefix are contiguous.

Attention work items (kernels/reference.py):

- a decode row attends to its own segment (q_len 1);
- a prefill chunk attends causally to its own segment (earlier chunks plus
  itself);
- every row attends fully to each shared prefix above it: one item covers a
  prefix's whole run of consecutive rows, decodes and prefill chunks alike,
  so the kernel reads the prefix's KV once for all of them.

A decode row whose input token is still being sampled on the device (the
previous step's output, see engine.py) gets input id -1 here and an entry in
`feed_rows` / `feed_src`: the runner copies the token there on the device.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain, groupby
from operator import attrgetter, itemgetter

import numpy as np

from .request_table import RequestTable
from .scheduler import Chunk, StepBatch
from .sequence import RequestSeq, Sequence

PLACEHOLDER = -1  # a token id not known on the host yet


@dataclass(frozen=True)
class HostWork:
    """The attention work list as int32 numpy arrays (see kernels/reference.py for the meaning)."""

    q_start: np.ndarray  # [N]
    q_len: np.ndarray  # [N]
    kv_len: np.ndarray  # [N]
    causal: np.ndarray  # [N]
    page_start: np.ndarray  # [N]
    page_ids: np.ndarray  # [P] (at least one entry)

    @property
    def num_items(self) -> int:
        return len(self.q_start)


@dataclass(frozen=True)
class SamplingArrays:
    """Per sampled row: how to sample it (the host side of `sampler.SamplingBatch`)."""

    temperature: np.ndarray  # [R] float32
    top_p: np.ndarray  # [R] float32
    top_k: np.ndarray  # [R] int64
    seed: np.ndarray  # [R] int64 (the seed's low 64 bits, as signed)
    step: np.ndarray  # [R] int64: index of the completion token being sampled
    greedy: np.ndarray  # [R] uint8
    all_greedy: bool
    any_filter: bool


@dataclass(frozen=True)
class StepInputs:
    """Everything one forward pass needs, on the host.  T tokens, R sampled rows, F fed rows."""

    input_ids: np.ndarray  # [T] int64; PLACEHOLDER where fed from the device
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64: page * page_size + offset, where each token's K and V go
    logits_rows: np.ndarray  # [R] int64: rows whose next token is sampled
    feed_rows: np.ndarray  # [F] int64: rows whose input token is the previous step's sample...
    feed_src: np.ndarray  # [F] int64: ...at this index of the previous step's sampled tokens
    work: HostWork
    sampling: SamplingArrays
    num_decodes: int  # rows [0, num_decodes) are decodes; a decode-only step has num_decodes == T

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def decode_only(self) -> bool:
        return self.num_decodes == len(self.input_ids)


def build_step_inputs(batch: StepBatch, page_size: int) -> StepInputs:
    """The host arrays of `batch` (its sampled rows are `batch.sampled`, in order).

    The decode rows (most rows of a decode-heavy step) are gathers from the scheduler's `RequestTable` by
    slot; what each row adds is read in C (`map` over the chunks), not by Python code per row.  The prefill
    chunks (a few per step) are one array each; the prefix-run items are found per run of rows below the
    same parent, not per row (see `_prefix_runs`).
    """
    decodes, rows, table = batch.decodes, _chunk_rows(batch), batch.table
    items = _Items()
    seqs = list(map(_seq, decodes))
    d_slots, d_starts = batch.decode_slots, batch.decode_starts
    ids, positions, kv_slots, feed, feed_src = _decode_rows(seqs, d_slots, d_starts, table, page_size, items)
    pre = [_prefill_rows(chunk, page_size, items, row) for chunk, row in rows]
    _prefix_runs(chain(decodes, batch.prefills), items)
    ids = np.concatenate([ids, *(p[0] for p in pre)])
    positions = np.concatenate([positions, *(p[1] for p in pre)])
    kv_slots = np.concatenate([kv_slots, *(p[2] for p in pre)])
    sampled = [(c, row) for c, row in rows if c.samples]
    logits_rows = np.concatenate([np.arange(len(decodes), dtype=np.int64),
                                  np.asarray([row + c.length - 1 for c, row in sampled], dtype=np.int64)])
    # a sampled chunk ends its request's tokens: a decode's end is its start + 1
    s_slots = np.concatenate([d_slots, np.asarray([c.seq.slot for c, _ in sampled], dtype=np.int64)])
    s_ends = np.concatenate([d_starts + 1, np.asarray([c.start + c.length for c, _ in sampled], dtype=np.int64)])
    return StepInputs(ids, positions, kv_slots, logits_rows, feed, feed_src, items.host_work(table),
                      sampling_arrays(table, s_slots, s_ends), len(decodes))


def _chunk_rows(batch: StepBatch) -> list[tuple[Chunk, int]]:
    """(prefill chunk, its first row) pairs."""
    out, row = [], len(batch.decodes)
    for chunk in batch.prefills:
        out.append((chunk, row))
        row += chunk.length
    return out


def page_array(seq: Sequence) -> np.ndarray:
    """`seq.pages` as an int32 array, kept on the sequence between steps.

    A page list only grows at its end (a decode's new page) or is replaced by another list (admission,
    freeing), so the array of the same list object is still right for its first pages: only new ones are
    converted, and a step's page table is one concatenation of arrays, not a walk over every page id.
    """
    pages, cached = seq.pages, seq.page_cache
    if cached is not None and cached[0] is pages:
        array = cached[1]
        if len(array) == len(pages):
            return array
        if len(array) < len(pages):
            array = np.concatenate([array, np.asarray(pages[len(array):], dtype=np.int32)])
            seq.page_cache = (pages, array)
            return array
    array = np.asarray(pages, dtype=np.int32)
    seq.page_cache = (pages, array)
    return array


class _Items:
    """Attention items as they are added, with whose pages they read: the decode rows' items as one block
    of arrays over table slots (they come first), then the others one by one over their sequences."""

    def __init__(self) -> None:
        self.block: tuple[np.ndarray, np.ndarray] | None = None  # (kv_len, table slots) of the decode rows
        self.q_start: list[int] = []
        self.q_len: list[int] = []
        self.kv_len: list[int] = []
        self.causal: list[int] = []
        self.owners: list[Sequence] = []

    def add_decodes(self, kv_len: np.ndarray, slots: np.ndarray) -> None:
        """One causal item of one row per decode, row i for decode i (before any other item), over the pages
        of the request in table slot `slots[i]`."""
        self.block = (kv_len.astype(np.int32), slots)

    def add(self, q_start: int, q_len: int, kv_len: int, causal: int, owner: Sequence) -> None:
        """An item over the pages of `owner`."""
        self.q_start.append(q_start)
        self.q_len.append(q_len)
        self.kv_len.append(kv_len)
        self.causal.append(causal)
        self.owners.append(owner)

    def host_work(self, table: RequestTable) -> HostWork:
        """The items as arrays, the decode block's first; its page lists come from the table in one gather."""
        as32 = lambda xs: np.asarray(xs, dtype=np.int32)  # noqa: E731
        columns = [as32(self.q_start), as32(self.q_len), as32(self.kv_len), as32(self.causal)]
        arrays = [page_array(s) for s in self.owners]
        counts = np.fromiter(map(len, arrays), dtype=np.int64, count=len(arrays))
        if self.block is not None:
            d_kv, d_slots = self.block
            ones = np.ones(len(d_kv), dtype=np.int32)
            block = [np.arange(len(d_kv), dtype=np.int32), ones, d_kv, ones]  # q_start, q_len, kv_len, causal
            columns = [np.concatenate(pair) for pair in zip(block, columns)]
            d_pages, d_counts = table.page_lists(d_slots)
            arrays, counts = [d_pages, *arrays], np.concatenate([d_counts, counts])
        page_ids = np.concatenate(arrays) if int(counts.sum()) else np.zeros(1, dtype=np.int32)
        page_start = (np.cumsum(counts) - counts).astype(np.int32)
        return HostWork(*columns, page_start, page_ids)


_seq = itemgetter(0)  # a chunk's sequence
_tokens = attrgetter("tokens")
_feed_index = attrgetter("feed_index")
_last = itemgetter(-1)


def _decode_rows(seqs: list[RequestSeq], slots: np.ndarray, starts: np.ndarray, table: RequestTable,
                 page_size: int, items: _Items):
    """ids, positions, KV slots, feed rows and feed sources of the decode rows (of `seqs`, in their table
    `slots`, from token index `starts`); their own-segment items.

    A decode's token is its request's last (it has one pending token); each row's last token and feed
    index are read in C, and everything else is gathered from the table by slot.
    """
    n = len(seqs)
    ids = np.fromiter(map(_last, map(_tokens, seqs)), dtype=np.int64, count=n)
    positions = table.start[slots] + starts
    pages = table.pages[slots, starts // page_size].astype(np.int64)
    kv_slots = pages * page_size + starts % page_size
    items.add_decodes(starts + 1, slots)
    feed = np.flatnonzero(ids == PLACEHOLDER)
    feed_src = np.fromiter(map(_feed_index, seqs), dtype=np.int64, count=n)[feed]
    return ids, positions, kv_slots, feed.astype(np.int64), feed_src


_parent = attrgetter("seq.parent")  # a chunk's parent prefix (in C: called once per row)


def _prefix_runs(chunks: Iterable[Chunk], items: _Items) -> None:
    """One item per maximal run of consecutive rows below the same prefix, at every level.

    chunks: the step's decodes then prefill chunks, in row order (a chunk's rows follow the previous one's).
    Consecutive chunks with the same parent have the same prefixes above: they are taken as one run of rows.
    """
    open_runs: dict[int, list] = {}  # id(prefix) -> [prefix, first row, end row]
    row = 0
    for parent, group in groupby(chunks, key=_parent):
        first = row
        for chunk in group:
            row += chunk.length
        if parent is None:
            continue
        for prefix in (*parent.ancestors(), parent):
            run = open_runs.get(id(prefix))
            if run is not None and run[2] == first:
                run[2] = row
                continue
            if run is not None:  # not contiguous (never in plan order): close the old run
                items.add(run[1], run[2] - run[1], len(run[0].tokens), 0, run[0])
            open_runs[id(prefix)] = [prefix, first, row]
    for prefix, first, end in open_runs.values():
        items.add(first, end - first, len(prefix.tokens), 0, prefix)


def _prefill_rows(chunk: Chunk, page_size: int, items: _Items, row: int):
    """ids, positions, slots of one prefill chunk; the item of its own causal segment."""
    seq, start, length = chunk
    span = np.arange(start, start + length, dtype=np.int64)
    ids = np.asarray(seq.tokens[start:start + length], dtype=np.int64)
    pages = page_array(seq).astype(np.int64)
    slots = pages[span // page_size] * page_size + span % page_size
    items.add(row, length, start + length, 1, seq)
    return ids, span + seq.start, slots


def sampling_arrays(table: RequestTable, slots: np.ndarray, ends: np.ndarray) -> SamplingArrays:
    """The sampling settings of the sampled rows (their requests' table `slots`), gathered from the table.

    ends: each sampled chunk's end, its request's length: the completion token it samples is the end less
    the prompt's length.
    """
    greedy = table.greedy[slots]
    return SamplingArrays(table.temperature[slots], table.top_p[slots], table.top_k[slots], table.seed[slots],
                          ends - table.num_prompt[slots], greedy, bool(greedy.all()), bool(table.filters[slots].any()))
