"""CUDA graphs for decode-only steps: one graph launch instead of about ten launches per layer.

A decode step on a fast GPU is bound by the host: each eager launch costs tens of
microseconds of Python and driver time, a step's GPU work a few milliseconds.  A
step whose batch is only decodes, B of them with B <= the largest bucket, replays
instead a graph captured for the bucket size B' >= B (`bucket_sizes`):

* Static inputs.  One int32 device buffer holds the step's token ids, positions and
  KV slots ([B'] each), its attention plan (attention_plan.FixedPlanLayout) and page
  ids.  The host lays a step out in a pinned buffer of the same layout and one copy
  moves it, so no pointer changes between capture and replay.
* Padding.  Rows B..B'-1 hold token 0 at position 0, write their K/V to a scratch
  page that the allocator never hands out (the runner keeps one page aside), are
  covered by no attention item (the merge writes zeros there) and are dropped
  before the LM head.  Every op of the model is row-wise except attention, so real rows see no
  padding; the attention plan is the eager path's plan (the same tiles), so the
  attention of real rows is computed exactly as eagerly.
* Fixed grids.  The attention launches (one per tile class) take capacity grids
  (prefix_attention's FIXED_GRID flag); programs past the step's counts, read from
  the device, do nothing.  A graph is keyed by the bucket and the kernel's tile
  classes; its big-tile, small-tile and partial capacities are powers of two that grow (a new capture) when a step
  needs more, up to the buffers' size.  A step past that runs eagerly.
* Capture lazily, on a bucket's first step: one eager warm-up run on the capture
  stream (it compiles the Triton kernels and sets up cuBLAS there), then the
  capture; all graphs share one memory pool.  The model's forward is inside, up to
  the final norm; the LM head runs eagerly on the real rows only (one launch), so
  no padded row pays for a [vocab] row of logits (on llama-1b the LM head is a fifth
  of a row's arithmetic) and a graph keeps only its hidden states [B', hidden].
  Sampling stays eager too.

Everything else (prefill chunks, mixed steps, batches above the largest bucket, the
torch attention) runs eagerly.  Buckets go every 64 rows above 512, up to 1024, so that a cap of more
than 512 requests (`Engine`'s default for an 8B model) pads a step of 532 rows to 576, not 768 (2% slower
on llama-8b skewed with the 768 bucket, H200, 2026-12-04).  Tests on the CPU pass `capture=run_eagerly`:
the same static path, without graphs.
"""
from __future__ import annotations

import bisect
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..kernels import AttentionWork, triton_supported
from ..kernels.attention_plan import PROGRAMS_PER_SM, FixedPlanLayout, tile_sizes
from ..kernels.prefix_attention import _num_sms, bind_plan, fixed_plan_layout, host_plan, supported_head_dim
from .batch import ForwardBatch
from .model import CausalLM
from .step_inputs import StepInputs

if TYPE_CHECKING:
    from ..kernels.attention_plan import HostPlan

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 576, 640, 704, 768, 832, 896, 960, 1024)
_MIN_TILES = 64  # the smallest tile grid captured (a power of two)
_MIN_PARTS = 64  # the smallest partial scratch captured

Capture = Callable[[Callable[[], torch.Tensor]], "tuple[Callable[[], Any], torch.Tensor]"]


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Graph batch sizes for decode batches of up to max_batch (capped at the largest of BUCKETS)."""
    top = min(max_batch, BUCKETS[-1])
    return tuple(b for b in BUCKETS if b < top) + (top,)


def bucket_for(num_rows: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest size >= num_rows, or None (no rows, or more than the largest)."""
    i = bisect.bisect_left(sizes, num_rows)
    return sizes[i] if num_rows >= 1 and i < len(sizes) else None


def grown_capacity(need: int, current: int, floor: int, ceiling: int) -> int:
    """A power of two >= need (and >= current, >= floor), at most ceiling."""
    return min(max(1 << max(need - 1, 0).bit_length(), current, floor), ceiling)


def run_eagerly(forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], Any], torch.Tensor]:
    """A stand-in for `CudaGraphCapture` (tests, no CUDA): "replay" reruns forward into the same output."""
    out = forward()
    return (lambda: out.copy_(forward())), out


class CudaGraphCapture:
    """Warm-up and capture on one side stream, every graph in one shared memory pool."""

    def __init__(self, device: torch.device):
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)

    def __call__(self, forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], Any], torch.Tensor]:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            forward()  # compiles the Triton kernels, sets up cuBLAS on this stream; same values as the replay
        torch.cuda.current_stream().wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a dask worker's) do not break our capture
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream, capture_error_mode="thread_local"):
            out = forward()
        return graph.replay, out


@dataclass
class _Graph:
    replay: Callable[[], Any]  # holds the graph
    out: torch.Tensor  # [size, hidden]: final hidden states, rewritten by each replay
    tiles: int  # capacities it was captured with: small tiles, partials, big tiles
    parts: int
    big: int
    work: AttentionWork  # the stand-in work list its plan is bound to (the binding lives as long as it)


@dataclass(frozen=True)
class _Capacity:
    """What `_graph_for` reads of a plan, for a capture ahead of any step."""

    variant: tuple[int, int, bool]
    num_tiles: int
    num_parts: int
    num_big: int


class StepGraphs:
    """What decode and mixed steps' graphs share: static inputs, their staging, capture and growth.

    A graph of `size` token rows is keyed by (size, the plan's tile classes) and replays a forward pass
    (`_forward`, the subclass's) over views of one static int32 buffer:

        [ids (cap) | positions (cap) | slots (cap) | attention plan (layout) | page ids (max_pages)]

    where cap is the largest size.  Padded rows (past the step's tokens) hold token 0 at position 0 and
    write their K/V to the scratch page; no attention item covers them.
    """

    def __init__(self, model: CausalLM, k_cache: torch.Tensor, v_cache: torch.Tensor, scratch_page: int,
                 sizes: tuple[int, ...], layout: FixedPlanLayout, max_pages: int, attention_backend: str,
                 capture: Capture | None):
        args = model.args
        self.model, self.k_cache, self.v_cache, self.backend = model, k_cache, v_cache, attention_backend
        self.device = k_cache.device
        self.num_heads, self.num_kv_heads = args.num_heads, args.num_kv_heads
        self.sizes = sizes
        self.scratch_slot = scratch_page * k_cache.shape[2]
        self.capture = capture or CudaGraphCapture(self.device)
        rows = self.sizes[-1]
        self.layout = layout
        self.max_pages = max_pages
        self._plan_at = 3 * rows  # [ids | positions | slots | plan | page ids]
        self._pages_at = self._plan_at + self.layout.size
        length = self._pages_at + self.max_pages
        on_cuda = self.device.type == "cuda"
        self.hosts = [torch.zeros(length, dtype=torch.int32, pin_memory=on_cuda) for _ in range(2)]
        self._host = [h.numpy() for h in self.hosts]
        self._turn = 0
        self.static = torch.zeros(length, dtype=torch.int32, device=self.device)
        self.all_rows = torch.arange(rows, device=self.device)
        self._copied = [torch.cuda.Event() if on_cuda else None for _ in range(2)]
        self.graphs: dict[tuple, _Graph] = {}
        self.replays = self.captures = self.eager_steps = 0

    def _plan(self, inputs: StepInputs, size: int) -> HostPlan | None:
        """The step's attention plan over `size` rows, or None (and counted) when it does not fit the buffers."""
        plan = host_plan(inputs.work, size, self.num_heads, self.num_kv_heads, self.device, split=self.split_plans)
        if not self.layout.fits(plan) or len(inputs.work.page_ids) > self.max_pages:
            self.eager_steps += 1
            return None
        return plan

    def _replay(self, inputs: StepInputs, size: int, plan: HostPlan,
                feed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Stage the step, feed its device-side ids, replay its graph; the graph's output (all `size` rows)."""
        self._stage(inputs, size, plan)
        if feed is not None:
            rows, src, tokens = feed
            self.static[:inputs.num_tokens].index_copy_(0, rows, tokens.index_select(0, src).to(torch.int32))
        graph = self._graph_for(size, plan)
        graph.replay()
        self.replays += 1
        return graph.out

    def _stage(self, inputs: StepInputs, size: int, plan: HostPlan) -> None:
        """Write the step into a pinned host buffer and copy it to the static one (real rows, then padding).

        Two host buffers take turns: the copy of the last step may still be reading the other one.
        """
        turn, self._turn = self._turn, 1 - self._turn
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # the copy that last read this buffer (two steps ago) is done
        n, cap, host = inputs.num_tokens, self.sizes[-1], self._host[turn]
        for i, (values, pad) in enumerate(((inputs.input_ids, 0), (inputs.positions, 0),
                                           (inputs.slots, self.scratch_slot))):
            host[i * cap:i * cap + n] = values
            host[i * cap + n:i * cap + size] = pad
        self.layout.write(host[self._plan_at:self._pages_at], plan)
        page_ids = inputs.work.page_ids
        used = self._pages_at + len(page_ids)
        host[self._pages_at:used] = page_ids
        self.static[:used].copy_(self.hosts[turn][:used], non_blocking=True)
        if self._copied[turn] is not None:
            self._copied[turn].record()

    def _graph_for(self, size: int, plan: HostPlan | _Capacity) -> _Graph:
        """The graph of this bucket and tile classes, captured (again, larger) when the plan needs more."""
        key = (size, *plan.variant)
        graph = self.graphs.get(key)
        small = plan.num_tiles - plan.num_big
        if graph is not None and small <= graph.tiles and plan.num_big <= graph.big and plan.num_parts <= graph.parts:
            return graph
        old = (graph.tiles, graph.parts, graph.big) if graph is not None else (0, 0, 0)
        tiles = grown_capacity(small, old[0], _MIN_TILES, self.layout.max_tiles)
        parts = grown_capacity(plan.num_parts, old[1], _MIN_PARTS, self.layout.max_parts)
        big = grown_capacity(plan.num_big, old[2], _MIN_TILES, self.layout.max_tiles)
        self.graphs.pop(key, None)  # its memory goes back to the pool before the new capture
        graph = self.graphs[key] = self._capture(size, plan.variant, tiles, parts, big)
        return graph

    def _capture(self, size: int, variant: tuple, tiles: int, parts: int, big: int) -> _Graph:
        cap = self.sizes[-1]
        plan_buffer = self.static[self._plan_at:self._pages_at]
        empty = self.static[:0]
        # A stand-in work list: the bound plan replaces its items, the kernel reads only page_ids.
        work = AttentionWork(empty, empty, empty, empty, empty, self.static[self._pages_at:], 0, 1, 0)
        bind_plan(work, self.layout.device_plan(plan_buffer, variant, tiles, size, parts, big))
        ids, positions, slots = (self.static[i * cap:i * cap + size] for i in range(3))

        def forward() -> torch.Tensor:
            batch = ForwardBatch(ids.long(), positions.long(), slots.long(), work, self.all_rows[:size])
            return self._forward(batch)

        replay, out = self.capture(forward)
        self.captures += 1
        return _Graph(replay, out, tiles, parts, big, work)

    split_plans = False  # the plan's big tiles: 64 rows (decode plans) or up to 128 (split, as eager steps)

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        raise NotImplementedError


class DecodeGraphs(StepGraphs):
    """Captures and replays the forward of decode-only steps, one graph per batch bucket.

    model, k_cache, v_cache: the runner's; scratch_page: a pool page the allocator never
    hands out; max_batch: the engine's max_num_seqs.  `run` returns the logits of a
    step's real rows, or None when the step must run eagerly.  Counters: `replays`,
    `captures`, `eager_steps` (decode-only steps that ran eagerly: too many rows, or a plan too big).
    """

    def __init__(self, model: CausalLM, k_cache: torch.Tensor, v_cache: torch.Tensor, scratch_page: int,
                 max_batch: int, attention_backend: str = "auto", capture: Capture | None = None):
        sizes = bucket_sizes(max_batch)
        layout = fixed_plan_layout(sizes[-1], model.args.num_kv_heads, k_cache.device)
        # a decode step names each page at most once
        super().__init__(model, k_cache, v_cache, scratch_page, sizes, layout, k_cache.shape[1], attention_backend,
                         capture)

    def run(self, inputs: StepInputs, feed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
            ) -> torch.Tensor | None:
        """Logits [B, vocab] (the model's dtype) of a decode-only step: the replay's hidden states of the real
        rows through the LM head (eager).  None: run the step eagerly.

        inputs: the step's host arrays, every row sampled.  feed: (rows, src, tokens) on the device: rows of
        the step whose input id is tokens[src] (the previous step's samples), written into the static ids.
        """
        n = inputs.num_tokens
        size = bucket_for(n, self.sizes)
        if size is None or len(inputs.logits_rows) != n:
            self.eager_steps += 1
            return None
        plan = self._plan(inputs, size)
        if plan is None:
            return None
        return self.model.compute_logits(self._replay(inputs, size, plan, feed)[:n])

    def capture_all(self) -> None:
        """Capture every bucket's graph now, as an engine starts (vLLM does the same), with the tile and
        partial capacities a decode step of that size usually needs: no generate call pays for captures
        (on the H100 they cost the first call of a shared-instructions run about a second).  A step that
        needs more still grows its graph later."""
        group = self.num_heads // self.num_kv_heads
        small_m, big_m = tile_sizes(group, 1)
        spread = 2 * PROGRAMS_PER_SM * _num_sms(self.device) // self.num_kv_heads  # split-K's prefix tiles
        for size in self.sizes:
            self._graph_for(size, _Capacity((small_m, big_m, False), size + 2 * spread, 2 * (size + spread), spread))

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        """The final-normed hidden state of every row (the LM head runs after, on the real rows: `run`)."""
        return self.model(batch, self.k_cache, self.v_cache, self.backend)


def unsupported_reason(model: CausalLM, k_cache: torch.Tensor, attention_backend: str) -> str | None:
    """Why this model's decode steps cannot be captured, or None when they can."""
    probe = k_cache[:0, 0, 0]  # an empty tensor of the cache's device and dtype
    if not k_cache.is_cuda:
        return "no CUDA device"
    if attention_backend == "torch" or not triton_supported(probe):
        return "the torch attention reads its work list on the host"
    if not supported_head_dim(model.args.head_dim):
        return f"head_dim {model.args.head_dim} has no Triton attention kernel"
    return None


def make_decode_graphs(model: CausalLM, k_cache: torch.Tensor, v_cache: torch.Tensor, scratch_page: int,
                       max_batch: int, attention_backend: str) -> DecodeGraphs | None:
    """DecodeGraphs where they can run; None (with a warning on CUDA) where not."""
    reason = unsupported_reason(model, k_cache, attention_backend)
    if reason is None:
        return DecodeGraphs(model, k_cache, v_cache, scratch_page, max_batch, attention_backend)
    if k_cache.is_cuda:
        warnings.warn(f"cuda_graphs: off ({reason})", stacklevel=3)
    return None
