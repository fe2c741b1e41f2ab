"""Runs a scheduled step on the device: batch to tensors, the model, the sampler.

It owns the KV pool tensors, [num_layers, num_pages, page_size, num_kv_heads,
head_dim] for keys and for values, and turns a `StepBatch` into a
`ForwardBatch`: packed token ids, positions, KV slots, and the attention work
list.  Work items (see kernels/reference.py):

- a decode row attends to its own segment (q_len 1), and, per shared prefix
  above it, to that prefix: the decode rows below one prefix are contiguous
  (rows are sorted by plan order), so one item covers the whole group and the
  kernel reads the prefix's KV once for all of them;
- a prefill chunk attends causally to its own segment (earlier chunks plus
  itself) and fully to each prefix above it.

Decode-only steps replay CUDA graphs when enabled (cuda_graphs.py); the rest runs eagerly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..kernels import AttentionWork
from .batch import ForwardBatch
from .model import CausalLM
from .sampler import SamplingBatch, apply_token_mask, sample
from .scheduler import Chunk, StepBatch
from .sequence import RequestSeq

if TYPE_CHECKING:
    from .cuda_graphs import DecodeGraphs


@dataclass
class _Rows:
    """Host-side lists for one step, turned into tensors once."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    logits_rows: list[int] = field(default_factory=list)
    q_start: list[int] = field(default_factory=list)
    q_len: list[int] = field(default_factory=list)
    kv_len: list[int] = field(default_factory=list)
    causal: list[int] = field(default_factory=list)
    pages: list[list[int]] = field(default_factory=list)

    def add_item(self, q_start: int, q_len: int, kv_len: int, causal: bool, pages: list[int]) -> None:
        self.q_start.append(q_start)
        self.q_len.append(q_len)
        self.kv_len.append(kv_len)
        self.causal.append(int(causal))
        self.pages.append(pages)


class ModelRunner:
    """Owns the KV pool; turns steps into forward passes (through `DecodeGraphs` where it can).

    The pool has one page more than num_pages, the allocator's: the padded rows of a CUDA
    graph's batch write their K/V there.  cuda_graphs: replay captured graphs for
    decode-only steps of up to max_num_seqs requests (CUDA and the Triton attention only).
    """

    def __init__(self, model: CausalLM, num_pages: int, page_size: int, attention_backend: str,
                 cuda_graphs: bool = False, max_num_seqs: int = 512):
        args = model.args
        param = next(model.parameters())
        self.model = model
        self.device = param.device
        self.page_size = page_size
        self.attention_backend = attention_backend
        self.scratch_page = num_pages
        shape = (args.num_layers, num_pages + 1, page_size, args.num_kv_heads, args.head_dim)
        self.k_cache = torch.empty(shape, dtype=param.dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=param.dtype, device=self.device)
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs:
            from .cuda_graphs import make_decode_graphs  # triton loads only where it runs
            self.graphs = make_decode_graphs(model, self.k_cache, self.v_cache, self.scratch_page, max_num_seqs,
                                             attention_backend)

    @torch.inference_mode()
    def run(self, batch: StepBatch, grammars: Any = None) -> list[int]:
        """Run one step; the sampled token of each chunk in `batch.sampled`, in that order.

        grammars: the call's `structured.GrammarMatchers` (or None); their masks are computed on
        the host after the forward pass is launched, while the device runs it.
        """
        rows = self._rows(batch)
        logits = None
        if self.graphs is not None and not batch.prefills:
            logits = self.graphs.run(rows)
        if logits is None:
            hidden = self.model(self._forward_batch(rows), self.k_cache, self.v_cache, self.attention_backend)
            if not rows.logits_rows:
                return []
            logits = self.model.compute_logits(hidden)
        seqs: list[RequestSeq] = [c.seq for c in batch.sampled]  # type: ignore[misc]
        mask = grammars.fill_mask([s.index for s in seqs]) if grammars is not None else None
        if mask is not None:
            logits = apply_token_mask(logits, mask.to(self.device, non_blocking=True))
        params = SamplingBatch.build([s.params for s in seqs], [s.seed for s in seqs],
                                     [len(s.output) for s in seqs], self.device)
        return sample(logits, params).tolist()

    def prepare(self, batch: StepBatch) -> ForwardBatch:
        return self._forward_batch(self._rows(batch))

    def _rows(self, batch: StepBatch) -> _Rows:
        rows = _Rows()
        self._add_decodes(rows, batch.decodes)
        for chunk in batch.prefills:
            self._add_prefill(rows, chunk)
        return rows

    def _forward_batch(self, rows: _Rows) -> ForwardBatch:
        as_tensor = lambda x: torch.tensor(x, dtype=torch.int64).to(self.device, non_blocking=True)  # noqa: E731
        work = AttentionWork.from_lists(rows.q_start, rows.q_len, rows.kv_len, rows.causal, rows.pages,
                                        device="cpu").to(self.device)
        return ForwardBatch(as_tensor(rows.input_ids), as_tensor(rows.positions), as_tensor(rows.slots),
                            work, as_tensor(rows.logits_rows))

    def _add_tokens(self, rows: _Rows, chunk: Chunk) -> int:
        """Append a chunk's tokens; returns its first row."""
        seq, first, size = chunk.seq, len(rows.input_ids), self.page_size
        span = range(chunk.start, chunk.start + chunk.length)
        rows.input_ids.extend(seq.tokens[chunk.start:chunk.start + chunk.length])
        rows.positions.extend(range(seq.start + span.start, seq.start + span.stop))
        rows.slots.extend([seq.pages[i // size] * size + i % size for i in span])
        if chunk.samples:
            rows.logits_rows.append(len(rows.input_ids) - 1)
        return first

    def _add_decodes(self, rows: _Rows, decodes: list[Chunk]) -> None:
        open_groups: dict[int, list] = {}  # id(prefix) -> [prefix, first row, last row]
        for chunk in decodes:
            row = self._add_tokens(rows, chunk)
            rows.add_item(row, 1, chunk.start + 1, True, chunk.seq.pages)
            for prefix in chunk.seq.ancestors():
                group = open_groups.get(id(prefix))
                if group is not None and group[2] == row - 1:
                    group[2] = row
                    continue
                if group is not None:  # not contiguous (never with plan order): close the old run
                    self._add_group(rows, *group)
                open_groups[id(prefix)] = [prefix, row, row]
        for group in open_groups.values():
            self._add_group(rows, *group)

    def _add_group(self, rows: _Rows, prefix, first: int, last: int) -> None:
        rows.add_item(first, last - first + 1, len(prefix.tokens), False, prefix.pages)

    def _add_prefill(self, rows: _Rows, chunk: Chunk) -> None:
        row = self._add_tokens(rows, chunk)
        for prefix in chunk.seq.ancestors():
            rows.add_item(row, chunk.length, len(prefix.tokens), False, prefix.pages)
        rows.add_item(row, chunk.length, chunk.start + chunk.length, True, chunk.seq.pages)
