"""The host path of the engine loop as it was before it was vectorized (issue 10), kept as the reference
that tests/test_host_path.py compares the current code with: the same schedule, the same step inputs,
the same placeholders and stops.  Not used by the library."""
from __future__ import annotations

from itertools import chain

import numpy as np

from batchllm_dask.engine.pipeline import SampledStep, _stop_reason
from batchllm_dask.engine.scheduler import Chunk, Scheduler, StepBatch
from batchllm_dask.engine.sequence import RequestSeq, Status
from batchllm_dask.engine.step_inputs import PLACEHOLDER, HostWork, SamplingArrays, StepInputs


def sampled_chunks(batch: StepBatch) -> list[Chunk]:
    """What StepBatch.sampled computed each time it was read."""
    return batch.decodes + [c for c in batch.prefills if c.samples]


class ReferenceScheduler(Scheduler):
    """The scheduler with its per-request decode loop as it was (then sorted by rank, as `schedule` did; the
    slots and starts that StepBatch carries now are read off the chunks)."""

    def _schedule_decodes(self):
        chunks = []
        for seq in list(self.running.values()):
            if len(chunks) >= self.max_batched_tokens:
                break
            if seq.status is Status.RUNNING and seq.pending == 1 and len(seq.tokens) > seq.num_prompt:
                if self._grow(seq, seq.num_computed + 1):
                    chunks.append(Chunk(seq, seq.num_computed, 1))
        chunks.sort(key=lambda c: c.seq.rank)
        return (chunks, np.asarray([c.seq.slot for c in chunks], dtype=np.int64),
                np.asarray([c.start for c in chunks], dtype=np.int64))


def mark_sampled(seqs: list[RequestSeq], max_model_len: int) -> SampledStep:
    positions = []
    for i, seq in enumerate(seqs):
        seq.tokens.append(PLACEHOLDER)
        seq.unresolved += 1
        seq.feed_index = i
        positions.append(len(seq.tokens) - 1)
        if len(seq.tokens) - seq.num_prompt >= seq.params.max_tokens or seq.end >= max_model_len:
            seq.status = Status.DRAINING
    return SampledStep(seqs, positions)


def resolve(step, values, stop_checker, finish, grammars=None) -> None:
    live = [(seq, pos, token) for seq, pos, token in zip(step.seqs, step.positions, values)
            if seq.status is not Status.FINISHED]
    ended = set(grammars.accept([s.index for s, _, _ in live], [t for _, _, t in live])) if grammars else ()
    for seq, pos, token in live:
        seq.tokens[pos] = token
        seq.unresolved -= 1
        reason = _stop_reason(seq, pos, token, stop_checker, seq.index in ended)
        if reason is not None:
            del seq.tokens[pos + 1:]
            seq.unresolved = 0
            seq.finish_reason = reason
            finish(seq)


def build_step_inputs(batch: StepBatch, page_size: int) -> StepInputs:
    """The host arrays of `batch` (its sampled rows are `sampled_chunks(batch)`, in order)."""
    items = _Items()
    dec = _decode_rows(batch.decodes, page_size, items)
    pre = [_prefill_rows(chunk, page_size, items, row) for chunk, row in _chunk_rows(batch)]
    segments = [(row, 1, c.seq) for row, c in enumerate(batch.decodes)]
    segments += [(row, c.length, c.seq) for c, row in _chunk_rows(batch)]
    _prefix_runs(segments, items)
    ids = np.concatenate([dec[0], *(p[0] for p in pre)])
    positions = np.concatenate([dec[1], *(p[1] for p in pre)])
    slots = np.concatenate([dec[2], *(p[2] for p in pre)])
    logits_rows = np.concatenate([np.arange(len(batch.decodes), dtype=np.int64),
                                  np.asarray([row + c.length - 1 for c, row in _chunk_rows(batch) if c.samples],
                                             dtype=np.int64)])
    feed = np.flatnonzero(ids[:len(batch.decodes)] == PLACEHOLDER)
    feed_src = np.asarray([batch.decodes[i].seq.feed_index for i in feed.tolist()], dtype=np.int64)
    sampled = [c.seq for c in sampled_chunks(batch)]
    return StepInputs(ids, positions, slots, logits_rows, feed.astype(np.int64), feed_src, items.host_work(),
                      sampling_arrays(sampled), len(batch.decodes))


def _chunk_rows(batch: StepBatch):
    """(prefill chunk, its first row) pairs."""
    row = len(batch.decodes)
    for chunk in batch.prefills:
        yield chunk, row
        row += chunk.length


class _Items:
    """Attention items as they are added, with their page lists."""

    def __init__(self) -> None:
        self.q_start: list[int] = []
        self.q_len: list[int] = []
        self.kv_len: list[int] = []
        self.causal: list[int] = []
        self.pages: list[list[int]] = []

    def add(self, q_start: int, q_len: int, kv_len: int, causal: int, pages: list[int]) -> None:
        self.q_start.append(q_start)
        self.q_len.append(q_len)
        self.kv_len.append(kv_len)
        self.causal.append(causal)
        self.pages.append(pages)

    def host_work(self) -> HostWork:
        counts = np.fromiter(map(len, self.pages), dtype=np.int64, count=len(self.pages))
        total = int(counts.sum())
        page_ids = np.fromiter(chain.from_iterable(self.pages), dtype=np.int32, count=total) if total else \
            np.zeros(1, dtype=np.int32)
        as32 = lambda xs: np.asarray(xs, dtype=np.int32)  # noqa: E731
        page_start = (np.cumsum(counts) - counts).astype(np.int32)
        return HostWork(as32(self.q_start), as32(self.q_len), as32(self.kv_len), as32(self.causal), page_start,
                        page_ids)


def _decode_rows(decodes: list[Chunk], page_size: int, items: _Items):
    """ids, positions, slots of the decode rows; their own-segment items and one item per prefix run."""
    n = len(decodes)
    seqs = [c.seq for c in decodes]
    starts = np.fromiter((c.start for c in decodes), dtype=np.int64, count=n)
    ids = np.fromiter((s.tokens[c.start] for s, c in zip(seqs, decodes)), dtype=np.int64, count=n)
    positions = np.fromiter((s.start for s in seqs), dtype=np.int64, count=n) + starts
    pages = np.fromiter((s.pages[c.start // page_size] for s, c in zip(seqs, decodes)), dtype=np.int64, count=n)
    slots = pages * page_size + starts % page_size
    for row, (seq, chunk) in enumerate(zip(seqs, decodes)):
        items.add(row, 1, chunk.start + 1, 1, seq.pages)
    return ids, positions, slots


def _prefix_runs(segments: list, items: _Items) -> None:
    """One item per maximal run of consecutive rows below the same prefix, at every level.

    segments: (first row, rows, sequence) in row order: a decode row, or a prefill chunk.
    """
    open_runs: dict[int, list] = {}  # id(prefix) -> [prefix, first row, end row]
    for row, length, seq in segments:
        for prefix in seq.ancestors():
            run = open_runs.get(id(prefix))
            if run is not None and run[2] == row:
                run[2] = row + length
                continue
            if run is not None:  # not contiguous (never in plan order): close the old run
                items.add(run[1], run[2] - run[1], len(run[0].tokens), 0, run[0].pages)
            open_runs[id(prefix)] = [prefix, row, row + length]
    for prefix, first, end in open_runs.values():
        items.add(first, end - first, len(prefix.tokens), 0, prefix.pages)


def _prefill_rows(chunk: Chunk, page_size: int, items: _Items, row: int):
    """ids, positions, slots of one prefill chunk; the item of its own causal segment."""
    seq, start, length = chunk
    span = np.arange(start, start + length, dtype=np.int64)
    ids = np.asarray(seq.tokens[start:start + length], dtype=np.int64)
    pages = np.asarray(seq.pages, dtype=np.int64)
    slots = pages[span // page_size] * page_size + span % page_size
    items.add(row, length, start + length, 1, seq.pages)
    return ids, span + seq.start, slots


def sampling_arrays(seqs: list[RequestSeq]) -> SamplingArrays:
    """The per-row sampling settings of the sampled requests (their cached `sampling_row`)."""
    n = len(seqs)
    rows = [s.sampling_row for s in seqs]
    temperature = np.fromiter((r[0] for r in rows), dtype=np.float32, count=n)
    top_p = np.fromiter((r[1] for r in rows), dtype=np.float32, count=n)
    top_k = np.fromiter((r[2] for r in rows), dtype=np.int64, count=n)
    seed = np.fromiter((r[3] for r in rows), dtype=np.int64, count=n)
    greedy = np.fromiter((r[4] for r in rows), dtype=np.uint8, count=n)
    step = np.fromiter((len(s.tokens) - s.num_prompt for s in seqs), dtype=np.int64, count=n)
    filters = np.fromiter((r[5] for r in rows), dtype=bool, count=n)
    return SamplingArrays(temperature, top_p, top_k, seed, step, greedy, bool(greedy.all()), bool(filters.any()))
