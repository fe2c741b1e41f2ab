"""The vectorized host path of the engine loop builds exactly what the per-request code before it built.

Two simulated engine loops (one step ahead of a fake device, as in test_pipeline.py) run the same requests:
one with the current scheduler, step inputs, placeholders and resolve, one with the reference copies of
the code as it was (tests/_reference_host_path.py).  Every step's schedule and every array of its step
inputs must be equal, and so must every request's tokens and finish reason: prefix sharing, chunked
prefill, preemption (small pools, low decode reserve), stops learned a step late and the model's context
limit included.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import _reference_host_path as ref
from batchllm_dask.engine import pipeline
from batchllm_dask.engine.config import SamplingParams
from batchllm_dask.engine.kv_cache import PageAllocator
from batchllm_dask.engine.sampler import sampling_row
from batchllm_dask.engine.scheduler import Scheduler
from batchllm_dask.engine.sequence import PrefixSeq
from batchllm_dask.engine.step_inputs import build_step_inputs
from test_scheduler import _sequences

EOS = 3
CURRENT = SimpleNamespace(scheduler=Scheduler, build=build_step_inputs, mark=pipeline.mark_sampled,
                          resolve=pipeline.resolve, sampled=lambda batch: batch.sampled)
REFERENCE = SimpleNamespace(scheduler=ref.ReferenceScheduler, build=ref.build_step_inputs, mark=ref.mark_sampled,
                            resolve=ref.resolve, sampled=ref.sampled_chunks)


class _NoStopStrings:
    def check(self, *_):
        raise AssertionError("no request has stop strings")


def _token(index: int, j: int, stop_at: dict[int, int]) -> int:
    return EOS if stop_at.get(index) == j else 10 + (index * 31 + j * 7) % 50


def _who(seq) -> tuple[str, int]:
    return ("prefix", seq.prefix_id) if isinstance(seq, PrefixSeq) else ("request", seq.index)


def _inputs_record(inputs) -> dict:
    """Every array of a StepInputs (dtype and values), and its scalars."""
    arrays = {name: getattr(inputs, name) for name in ("input_ids", "positions", "slots", "logits_rows",
                                                        "feed_rows", "feed_src")}
    arrays.update({f"work.{n}": getattr(inputs.work, n) for n in ("q_start", "q_len", "kv_len", "causal",
                                                                  "page_start", "page_ids")})
    s = inputs.sampling
    arrays.update({f"sampling.{n}": getattr(s, n) for n in ("temperature", "top_p", "top_k", "seed", "step",
                                                            "greedy")})
    record = {name: (str(a.dtype), a.tolist()) for name, a in arrays.items()}
    record.update(num_decodes=inputs.num_decodes, all_greedy=s.all_greedy, any_filter=s.any_filter)
    return record


def _simulate(impl, prompts, max_tokens, params, stop_at, num_pages, page_size, budget, reserve, max_model_len):
    """The trace of one simulated loop: per step its chunks and inputs; then every request's outcome."""
    _, _, requests = _sequences(prompts, max_tokens)
    for seq in requests:
        seq.params = params[seq.index]
        seq.sampling_row = sampling_row(seq.params, 1000 + seq.index)
        seq.stop_ids = frozenset({EOS})
    scheduler = impl.scheduler(requests, PageAllocator(num_pages), page_size, budget, max_running=64,
                               decode_reserve=reserve)
    trace, in_flight = [], None
    for _ in range(100_000):
        launched = None
        if not scheduler.done:
            batch = scheduler.schedule()
            trace.append(("failed", [s.index for s in batch.failed]))
            if batch.num_tokens:
                trace.append(("chunks", [(_who(c.seq), c.start, c.length) for c in batch.decodes + batch.prefills]))
                trace.append(("inputs", _inputs_record(impl.build(batch, page_size))))
                sampled = [c.seq for c in impl.sampled(batch)]
                values = [_token(s.index, len(s.tokens) - s.num_prompt, stop_at) for s in sampled]
                scheduler.commit(batch)
                launched = (impl.mark(sampled, max_model_len), values)
        if in_flight is not None:
            impl.resolve(in_flight[0], in_flight[1], _NoStopStrings(), scheduler.finish)
        elif launched is None:
            break
        in_flight = launched
    trace.append(("preemptions", scheduler.num_preemptions, scheduler.recomputed_tokens))
    trace.append(("outcome", sorted((s.index, s.finish_reason, list(s.output)) for s in requests)))
    return trace


_prompts = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=48), min_size=1, max_size=40)
_params = st.builds(SamplingParams, max_tokens=st.integers(1, 12), temperature=st.sampled_from([0.0, 0.7, 1.0]),
                    top_p=st.sampled_from([1.0, 0.9]), top_k=st.sampled_from([-1, 5]))


@settings(max_examples=120, deadline=None)
@given(_prompts, st.data(), st.sampled_from([1, 4, 16]), st.integers(16, 96), st.integers(8, 400),
       st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([40, 10_000]))
def test_the_schedule_and_step_inputs_are_those_of_the_reference(prompts, data, page_size, budget, num_pages,
                                                                 reserve, max_model_len):
    n = len(prompts)
    params = data.draw(st.lists(_params, min_size=n, max_size=n))
    stop_at = data.draw(st.dictionaries(st.integers(0, n - 1), st.integers(0, 11)))
    args = (prompts, [p.max_tokens for p in params], params, stop_at, num_pages, page_size, budget, reserve,
            max_model_len)
    assert _simulate(CURRENT, *args) == _simulate(REFERENCE, *args)


def test_a_decode_heavy_batch_below_nested_prefixes_matches_the_reference():
    """Many decodes below two levels of shared prefixes, interleaved with prefill chunks: the prefix-run
    items cover runs of rows that mix decodes and chunks."""
    rng = np.random.default_rng(0)
    systems = [rng.integers(4, 50, size=40).tolist() for _ in range(3)]
    docs = [rng.integers(4, 50, size=30).tolist() for _ in range(6)]
    prompts = [systems[i % 3] + docs[i % 6] + rng.integers(4, 50, size=int(rng.integers(1, 20))).tolist()
               for i in range(120)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 30)), temperature=0.0) for _ in prompts]
    args = (prompts, [p.max_tokens for p in params], params, {5: 3, 17: 0}, 4000, 16, 64, 1.0, 10_000)
    current = _simulate(CURRENT, *args)
    assert current == _simulate(REFERENCE, *args)
    steps = [record for kind, record in (t[:2] for t in current) if kind == "inputs"]
    assert any(r["num_decodes"] > 20 and len(r["input_ids"][1]) > r["num_decodes"] for r in steps), \
        "some step mixes many decodes with prefill chunks"
