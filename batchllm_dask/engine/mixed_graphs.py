"""CUDA graphs for steps with prefill chunks: the whole forward pass of a mixed step in one launch.

A decode-only step replays a graph of cuda_graphs.py.  A step that also carries prefill chunks (new
requests' prompts beside the running decodes: the steady state of a batch job) used to run eagerly: some
ten launches per layer, each tens of microseconds of Python and driver time.  On a small model that is
longer than the GPU's work (llama-1b on an H200: about 3.6 ms of host time a step), so the GPU waits.

`MixedGraphs` captures the same forward per *token* bucket (`mixed_bucket_sizes`: every 64 tokens up to
1024, then every 128 and 256, up to `EngineConfig.cuda_graph_max_tokens`), with the fixed-grid attention
of the decode graphs, over the split plan the eager path uses (the same tiles, so real rows get the eager
values).  The scheduler sizes such steps to a bucket where it can (`Scheduler(step_sizes=...)` shortens the
last prefill chunks; the tokens it cuts run in the next step), so padding is only paid where there was no
prefill to shorten.  Rows past the step's tokens are padding, as in decode graphs.

What differs from a decode graph: not every row is sampled, so the graph ends with the final norm of
every row, and the LM head runs eagerly on the sampled rows only (two launches).  Graphs are captured at
start for the common tile classes (`capture_all`); others, and plans that outgrow a graph's capacities,
are captured when first needed.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ..kernels.attention_plan import PROGRAMS_PER_SM, FixedPlanLayout, HostPlan, tile_sizes
from ..kernels.prefix_attention import _num_sms
from .batch import ForwardBatch
from .cuda_graphs import Capture, StepGraphs, _Capacity, bucket_for, grown_capacity
from .model import CausalLM
from .step_inputs import StepInputs


def mixed_bucket_sizes(max_tokens: int) -> tuple[int, ...]:
    """Token counts of mixed-step graphs up to max_tokens: steps of 64 to 1024, of 128 to 2048, then of 256."""
    sizes = [*range(64, 1025, 64), *range(1152, 2049, 128), *range(2304, max(max_tokens, 2304) + 1, 256)]
    return tuple(s for s in sizes if s <= max_tokens)


def mixed_plan_layout(max_tokens: int, num_kv_heads: int, device: torch.device) -> FixedPlanLayout:
    """Room for the fixed-grid plans of mixed steps of up to max_tokens rows.

    A decode row adds a suffix tile and its share of prefix tiles; a prefill chunk's query blocks of 32
    rows (a 128-row tile at GQA 4) each split its keys a few times; split-K adds a spread.  A step whose
    plan needs more runs eagerly.
    """
    spread = 2 * PROGRAMS_PER_SM * _num_sms(device) // num_kv_heads
    max_tiles = 4 * max_tokens + 2 * spread + 64
    return FixedPlanLayout(max_tiles, max_tokens, 2 * max_tiles + 4 * max_tokens)


class MixedGraphs(StepGraphs):
    """Captures and replays the forward of steps with prefill chunks, one graph per token bucket.

    `run` returns the logits of a step's sampled rows, or None when the step must run eagerly (more tokens
    than the largest bucket, or a plan too big for the buffers).  Counters as DecodeGraphs'.
    """

    split_plans = True

    def __init__(self, model: CausalLM, k_cache: torch.Tensor, v_cache: torch.Tensor, scratch_page: int,
                 max_tokens: int, attention_backend: str = "auto", capture: Capture | None = None,
                 sizes: tuple[int, ...] | None = None, max_decodes: int = 512):
        sizes = sizes or mixed_bucket_sizes(max_tokens)  # (tests give small sizes of their own)
        self.max_decodes = max_decodes  # the engine's max_num_seqs: decode rows a step can have
        layout = mixed_plan_layout(sizes[-1], model.args.num_kv_heads, k_cache.device)
        # a prefix's pages are listed once per run of rows below it: decodes, then prefill chunks
        super().__init__(model, k_cache, v_cache, scratch_page, sizes, layout, 2 * k_cache.shape[1] + 64,
                         attention_backend, capture)

    def run(self, inputs: StepInputs, logits_rows: torch.Tensor,
            feed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Logits [R, vocab] (the model's dtype) of the step's sampled rows, by replay; None: run the step eagerly.

        logits_rows: the sampled rows on the device (inputs.logits_rows, staged).  feed: as DecodeGraphs.run.
        """
        size = bucket_for(inputs.num_tokens, self.sizes)
        if size is None:
            self.eager_steps += 1
            return None
        plan = self._plan(inputs, size)
        if plan is None:
            return None
        hidden = self._replay(inputs, size, plan, feed)
        return self.model.compute_logits(hidden.index_select(0, logits_rows))

    def _plan(self, inputs: StepInputs, size: int) -> HostPlan | None:
        """The split plan, always run by the causal kernel: a plan without causal chunks (decodes beside
        one-token chunks) sees every key it would see without the mask, so it shares the causal graph."""
        plan = super()._plan(inputs, size)
        return plan if plan is None or plan.has_causal else replace(plan, has_causal=True)

    def capture_all(self) -> None:
        """Capture every bucket's graph now, with the capacities that steps of its size need (measured on the
        standard workloads at llama-1b's heads and 132 SMs: decodes' small tiles under twice the decode rows,
        big tiles under an eighth of the tokens, partials under four per token); 64-row big tiles (a step
        whose items are all short) for the small buckets only.  A plan that needs more grows its graph."""
        group = self.num_heads // self.num_kv_heads
        for size in self.sizes:
            small = grown_capacity(2 * min(size, self.max_decodes) + 64, 0, 1, self.layout.max_tiles)
            big = grown_capacity(size // 8 + 64, 0, 1, self.layout.max_tiles)
            parts = grown_capacity(4 * size + 256, 0, 1, self.layout.max_parts)
            for big_m in (128, 64) if size <= 256 else (128,):
                variant = (*tile_sizes(group, big_m, big_m), True)
                self._graph_for(size, _Capacity(variant, small + big, parts, big))

    def _forward(self, batch: ForwardBatch) -> torch.Tensor:
        """The final-normed hidden state of every row (the norm is per row: the sampled ones are picked after)."""
        return self.model(batch, self.k_cache, self.v_cache, self.backend)
