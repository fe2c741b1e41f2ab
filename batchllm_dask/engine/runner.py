"""Runs a scheduled step on the device without waiting for it: inputs in, sampled tokens out, asynchronously.

It owns the KV pool tensors, [num_layers, num_pages + 1, page_size,
num_kv_heads, head_dim] for keys and for values (the extra page is the CUDA
graphs' scratch page), and turns a step's host arrays (`StepInputs`, built by
step_inputs.py) into a forward pass:

1. one host-to-device copy of every input (staging.py), the attention plan
   included where the Triton kernel runs (planned here, on the host, from the
   host work list: no device round trip);
2. the input ids of decode rows whose token the previous step is still
   sampling are copied on the device from that step's output (the feed);
3. the forward pass, replayed from a CUDA graph where it can (cuda_graphs.py for
   decode-only steps, mixed_graphs.py for steps with prefill chunks of up to
   `cuda_graph_max_tokens`), eager otherwise; logits for the sampled rows only;
4. sampling on the device (`sample`, with structured output's token mask where a
   row has one), and the tokens copied into pinned memory behind an event
   (`SampledTokens`): neither call waits for the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..kernels import AttentionWork, uses_triton
from .batch import ForwardBatch
from .model import CausalLM
from .sampler import SamplingBatch, apply_token_mask, sample
from .staging import SampledTokens, Stager, TokenReturn
from .step_inputs import HostWork, SamplingArrays, StepInputs

if TYPE_CHECKING:
    from .cuda_graphs import DecodeGraphs
    from .mixed_graphs import MixedGraphs

_WORK_FIELDS = ("q_start", "q_len", "kv_len", "causal", "page_start", "page_ids")


@dataclass(frozen=True)
class StepLogits:
    """A launched step's logits [R, vocab] in the model's dtype (device) and how to sample each row."""

    logits: torch.Tensor
    sampling: SamplingBatch


class ModelRunner:
    """Owns the KV pool; launches steps (through `DecodeGraphs` where it can).

    cuda_graphs: replay captured graphs for decode-only steps of up to max_num_seqs requests and for steps
    with prefill chunks of up to graph_max_tokens tokens (0: those run eagerly) (CUDA and the Triton
    attention only; elsewhere ignored).
    """

    def __init__(self, model: CausalLM, num_pages: int, page_size: int, attention_backend: str,
                 cuda_graphs: bool = False, max_num_seqs: int = 512, graph_max_tokens: int = 0):
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
        self.triton_plans = uses_triton(attention_backend, self.device, param.dtype, args.head_dim)
        self.stager = Stager(self.device)
        self.returns = TokenReturn(self.device)
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedGraphs | None = None
        self.token_sync = None  # tensor parallel: makes every rank's sampled tokens rank 0's (parallel.py)
        if cuda_graphs:
            from .cuda_graphs import make_decode_graphs  # triton loads only where it runs
            self.graphs = make_decode_graphs(model, self.k_cache, self.v_cache, self.scratch_page, max_num_seqs,
                                             attention_backend)
        if self.graphs is not None and graph_max_tokens >= 64:
            from . import mixed_graphs
            self.mixed_graphs = mixed_graphs.MixedGraphs(model, self.k_cache, self.v_cache, self.scratch_page,
                                                         graph_max_tokens, attention_backend,
                                                         max_decodes=max_num_seqs)
        # token counts at which a step with prefill chunks replays a graph: the scheduler aims for them
        self.step_sizes: tuple[int, ...] = self.mixed_graphs.sizes if self.mixed_graphs is not None else ()

    @torch.inference_mode()
    def forward(self, inputs: StepInputs, previous: SampledTokens | None) -> StepLogits:
        """Queue one step's forward pass on the device; its logits (one row per `inputs.logits_rows`) come back.

        previous: the last step's tokens, where some of this step's input ids are still on the device.
        """
        graphed = self.graphs is not None and inputs.decode_only
        mixed = (not inputs.decode_only and self.mixed_graphs is not None
                 and inputs.num_tokens <= self.mixed_graphs.sizes[-1])
        plan = None if graphed or mixed or not self.triton_plans else self._host_plan(inputs)
        dev = self.stager.stage(_arrays(inputs, plan, graphed or mixed, sampled_rows=mixed))
        feed = (dev["feed_rows"], dev["feed_src"], previous.device) if len(inputs.feed_rows) else None
        logits = None
        if graphed:
            logits = self.graphs.run(inputs, feed)
        elif mixed:
            logits = self.mixed_graphs.run(inputs, dev["logits_rows"], feed)
        if logits is None:
            if "input_ids" not in dev:  # a step that the graphs could not take: stage all of it again
                # One staging per launch: a second `stage` reuses the device buffer, so the first one's views
                # (feed rows, sampling settings) would then read the second one's bytes.
                plan = self._host_plan(inputs) if self.triton_plans else None
                dev = self.stager.stage(_arrays(inputs, plan, graphed=False))
                feed = (dev["feed_rows"], dev["feed_src"], previous.device) if feed is not None else None
            logits = self._eager(inputs, dev, plan, feed)
        return StepLogits(logits, _sampling_batch(inputs.sampling, dev))

    @torch.inference_mode()
    def sample(self, step: StepLogits, mask: torch.Tensor | None = None) -> SampledTokens:
        """Queue the sampling of a step's logits; the tokens reach the host behind an event.

        mask: structured output's host int32 bitmask [R, ceil(V/32)] (structured.py), or None.
        """
        logits = step.logits
        if mask is not None:
            logits = apply_token_mask(logits, mask.to(self.device, non_blocking=True))
        tokens = sample(logits, step.sampling)
        return self.returns.send(tokens if self.token_sync is None else self.token_sync(tokens))

    def _eager(self, inputs: StepInputs, dev: dict, plan, feed) -> torch.Tensor:
        input_ids = dev["input_ids"]
        if feed is not None:
            rows, src, tokens = feed
            input_ids.index_copy_(0, rows, tokens.index_select(0, src))
        work = _device_work(inputs.work, dev)
        if plan is not None:
            from ..kernels import attention_plan as ap
            from ..kernels.prefix_attention import attach_plan
            attach_plan(work, ap.device_plan_from_arrays(plan, dev))
        batch = ForwardBatch(input_ids, dev["positions"], dev["slots"], work, dev["logits_rows"])
        hidden = self.model(batch, self.k_cache, self.v_cache, self.attention_backend)
        return self.model.compute_logits(hidden)

    def _host_plan(self, inputs: StepInputs):
        """The attention plan of an eager step: split launches (128-row big tiles apart, prefix_attention.py)."""
        from ..kernels.prefix_attention import host_plan
        args = self.model.args
        return host_plan(inputs.work, inputs.num_tokens, args.num_heads, args.num_kv_heads, self.device, split=True)


def _arrays(inputs: StepInputs, plan, graphed: bool, sampled_rows: bool = False) -> dict[str, np.ndarray]:
    """The named arrays of a step to stage: sampling and feed always; the forward inputs unless graphed
    (a mixed step's graph still takes its sampled rows: `sampled_rows`)."""
    s = inputs.sampling
    out: dict[str, np.ndarray] = dict(feed_rows=inputs.feed_rows, feed_src=inputs.feed_src,
                                      s_temperature=s.temperature, s_top_p=s.top_p, s_top_k=s.top_k, s_seed=s.seed,
                                      s_step=s.step, s_greedy=s.greedy)
    if sampled_rows:
        out.update(logits_rows=inputs.logits_rows)
    if not graphed:
        out.update(input_ids=inputs.input_ids, positions=inputs.positions, slots=inputs.slots,
                   logits_rows=inputs.logits_rows)
        out.update({f"w_{name}": getattr(inputs.work, name) for name in _WORK_FIELDS})
        if plan is not None:
            from ..kernels import attention_plan as ap
            out.update(ap.host_plan_arrays(plan))
    return out


def _device_work(work: HostWork, dev: dict) -> AttentionWork:
    """The step's work list on the device, with its host copy (the torch reference reads that)."""
    host = AttentionWork(*(torch.from_numpy(getattr(work, name)) for name in _WORK_FIELDS), work.num_items,
                         int(work.q_len.max(initial=0)), int(work.kv_len.max(initial=0)))
    return AttentionWork(*(dev[f"w_{name}"] for name in _WORK_FIELDS), host.num_items, host.max_q_len,
                         host.max_kv_len, host)


def _sampling_batch(s: SamplingArrays, dev: dict) -> SamplingBatch:
    return SamplingBatch(dev["s_temperature"], dev["s_top_p"], dev["s_top_k"], dev["s_seed"], dev["s_step"],
                         dev["s_greedy"].view(torch.bool), s.all_greedy, s.any_filter)
