"""The host one step ahead of the device (engine/pipeline.py), against a simulated device (no torch).

The simulation launches step n+1 before it resolves step n's tokens, exactly as the engine loop does, with
a "device" whose token for request i at output index j is a fixed function f(i, j): so every request's
output is known in advance, and every input the host builds can be checked, including the ids fed on the
device from the previous step's samples.
"""
from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm_dask.engine.kv_cache import PageAllocator
from batchllm_dask.engine.pipeline import mark_sampled, resolve
from batchllm_dask.engine.sampler import sampling_row
from batchllm_dask.engine.scheduler import Scheduler
from batchllm_dask.engine.sequence import Status
from batchllm_dask.engine.step_inputs import PLACEHOLDER, build_step_inputs
from test_scheduler import _check_table, _sequences

EOS = 3


def _token(index: int, j: int, stop_at: dict[int, int]) -> int:
    return EOS if stop_at.get(index) == j else 10 + (index * 31 + j * 7) % 50


def _expected(index: int, max_tokens: int, stop_at: dict[int, int]) -> list[int]:
    out = []
    for j in range(max_tokens):
        out.append(_token(index, j, stop_at))
        if out[-1] == EOS:
            break
    return out


class _NoStopStrings:
    """The pipeline consults the stop checker only for requests with stop strings: none here."""

    def check(self, *_):
        raise AssertionError("no request has stop strings")


def _run(prompts, max_tokens, stop_at, num_pages, page_size, budget, reserve, max_model_len=10_000):
    plan, prefixes, requests = _sequences(prompts, max_tokens)
    for seq in requests:
        seq.sampling_row = sampling_row(seq.params, 0)
        seq.stop_ids = frozenset({EOS})
    scheduler = Scheduler(requests, PageAllocator(num_pages), page_size, budget, max_running=64,
                          decode_reserve=reserve)
    finished, decode_rows, in_flight = [], Counter(), None
    for _ in range(100_000):
        launched = None
        if not scheduler.done:
            batch = scheduler.schedule()
            _check_table(scheduler)
            finished += [s.index for s in batch.failed]
            if batch.num_tokens:
                inputs = build_step_inputs(batch, page_size)
                previous = in_flight[1] if in_flight is not None else []
                for row, chunk in enumerate(batch.decodes):
                    seq = chunk.seq
                    truth = _token(seq.index, chunk.start - seq.num_prompt, stop_at)
                    fed = inputs.input_ids[row] == PLACEHOLDER
                    got = previous[inputs.feed_src[list(inputs.feed_rows).index(row)]] if fed else inputs.input_ids[row]
                    assert got == truth, "a decode's input is its last sampled token, fed or known"
                    decode_rows[seq.index] += 1
                values = [_token(c.seq.index, len(c.seq.tokens) - c.seq.num_prompt, stop_at) for c in batch.sampled]
                scheduler.commit(batch)
                launched = (mark_sampled([c.seq for c in batch.sampled], max_model_len), values)
        if in_flight is not None:
            resolve(in_flight[0], in_flight[1], _NoStopStrings(), lambda s: (scheduler.finish(s), finished.append(s.index)))
        elif launched is None:
            assert scheduler.done, "progress"
            break
        in_flight = launched
    assert scheduler.allocator.num_used == 0, "every page is returned"
    # a request's first token comes from its prefill, each later one from a decode row: the rest were wasted
    wasted_rows = sum(decode_rows[s.index] - max(len(s.output) - 1, 0) for s in requests if s.finish_reason != "error")
    return requests, finished, scheduler, wasted_rows


_prompts = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=40), min_size=1, max_size=24)


@settings(max_examples=150, deadline=None)
@given(_prompts, st.data(), st.sampled_from([1, 4, 8]), st.integers(16, 64), st.integers(6, 200),
       st.sampled_from([0.0, 0.5, 1.0]))
def test_one_step_late_tokens_lose_nothing(prompts, data, page_size, budget, num_pages, reserve):
    """Every request finishes exactly once with exactly its tokens, whether it stops on max_tokens or on EOS
    learned a step late, under any pool size (preemption included) and token budget."""
    n = len(prompts)
    max_tokens = data.draw(st.lists(st.integers(1, 12), min_size=n, max_size=n))
    stop_at = data.draw(st.dictionaries(st.integers(0, n - 1), st.integers(0, 11)))
    requests, finished, scheduler, wasted = _run(prompts, max_tokens, stop_at, num_pages, page_size, budget, reserve)
    assert sorted(finished) == list(range(n))
    if scheduler.num_preemptions == 0:  # (a recomputed request's decodes restart: its rows count twice)
        assert wasted <= sum(1 for i in stop_at if i < n), "at most one wasted row per request that stops on EOS"
    for seq in requests:
        assert seq.status is Status.FINISHED
        if seq.finish_reason == "error":
            continue
        assert list(seq.output) == _expected(seq.index, max_tokens[seq.index], stop_at)
        assert seq.finish_reason == ("stop" if seq.output[-1] == EOS else "length")
        assert seq.unresolved == 0 and PLACEHOLDER not in seq.tokens


def test_a_request_stopped_by_eos_costs_one_wasted_row():
    """EOS is learned one step late: the request was already in the next step (one wasted row), no more."""
    prompts = [[1, 2, 3, 4], [5, 6, 7, 8]]
    requests, finished, _, wasted = _run(prompts, [10, 10], {0: 2}, 100, 4, 64, 1.0)
    assert wasted == 1
    assert [len(s.output) for s in requests] == [3, 10]


def test_the_models_context_ends_a_request_like_max_tokens():
    requests, finished, _, wasted = _run([[1, 2, 3, 4]], [50], {}, 100, 4, 64, 1.0, max_model_len=9)
    assert len(requests[0].output) == 5 and requests[0].finish_reason == "length" and wasted == 0


def test_a_recomputed_request_left_one_token_by_its_prefill_is_computed_once():
    """Preempted (reserve 0, a small pool), the long request is recomputed in chunks; its last chunk leaves
    one token, which the decode pass takes: the prefill pass must not take it in the same step too."""
    prompts = [[0]] * 7 + [[0, 0]] * 2 + [[0], [0], [1] + [0] * 10]
    max_tokens = [1] * 8 + [3, 7, 7, 7]
    requests, finished, scheduler, _ = _run(prompts, max_tokens, {}, 29, 1, 16, 0.0)
    assert scheduler.num_preemptions > 0, "the case needs a recomputed request"
    assert sorted(finished) == list(range(len(prompts)))
    for seq in requests:
        assert list(seq.output) == _expected(seq.index, max_tokens[seq.index], {})
