"""Memory pressure: a KV pool far too small for the batch, a request that can never fit, CUDA out-of-memory
inside a step.  Nothing is lost: every request completes with an unconstrained run's greedy tokens, or gets a
per-row error that says how much memory it needs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import batchllm_dask  # noqa: F401 - registers the accessors
from batchllm_dask.caches import EngineSpec, engine_stats, get_engine
from batchllm_dask.engine import Engine, SamplingParams
from batchllm_dask.engine.kv_cache import pages_for

CPU = {"dtype": "float32", "device": "cpu"}
PAGE = 8
PREFIX = 24


def shared_prefix_batch(n: int = 24, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """n token-id prompts under 3 shared prefixes of PREFIX tokens, own suffixes of 2-8, outputs of 6-12."""
    rng = np.random.default_rng(seed)
    prefixes = [rng.integers(3, 259, PREFIX).tolist() for _ in range(3)]
    prompts = [prefixes[i % 3] + rng.integers(3, 259, int(rng.integers(2, 9))).tolist() for i in range(n)]
    return prompts, rng.integers(6, 13, n).tolist()


def batch_pages(prompts: list[list[int]], max_tokens: list[int]) -> int:
    """KV pages the batch needs at once: each shared prefix once, each request's suffix and output."""
    prefixes = len({tuple(p[:PREFIX]) for p in prompts})
    return prefixes * pages_for(PREFIX, PAGE) + sum(pages_for(len(p) - PREFIX + m, PAGE)
                                                    for p, m in zip(prompts, max_tokens))


def greedy(max_tokens: list[int]) -> list[SamplingParams]:
    return [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]


@pytest.fixture(scope="module")
def page_bytes(tiny_llama_dir) -> int:
    return Engine(tiny_llama_dir, kv_cache_bytes=1 << 20, page_size=PAGE, **CPU)._page_bytes()


@pytest.fixture(scope="module")
def batch_and_reference(tiny_llama_dir):
    prompts, max_tokens = shared_prefix_batch()
    engine = Engine(tiny_llama_dir, kv_cache_bytes=64 << 20, page_size=PAGE, **CPU)
    want = [o.token_ids for o in engine.generate(prompts, greedy(max_tokens))]
    assert engine.last_stats.preemptions == 0 and engine.num_kv_pages >= batch_pages(prompts, max_tokens)
    return prompts, max_tokens, want


@pytest.mark.slow
@pytest.mark.parametrize("decode_reserve", [0.0, 1.0])
def test_a_kv_pool_ten_times_too_small_loses_nothing(decode_reserve, tiny_llama_dir, page_bytes,
                                                     batch_and_reference):
    """A pool of a tenth of the pages the batch needs at once.  With no decode reserve admission is optimistic
    and the pool runs dry: requests are preempted and recomputed (the stats show it); with the default full
    reserve admission waits instead and nothing is recomputed.  Either way every request completes with the
    unconstrained run's greedy tokens and the pool is never exceeded."""
    prompts, max_tokens, want = batch_and_reference
    pool = batch_pages(prompts, max_tokens) // 10
    engine = Engine(tiny_llama_dir, kv_cache_bytes=pool * page_bytes, page_size=PAGE,
                    decode_reserve=decode_reserve, **CPU)
    assert engine.num_kv_pages == pool
    outs = engine.generate(prompts, greedy(max_tokens))
    stats = engine.last_stats
    assert [o.token_ids for o in outs] == want
    assert all(o.finish_reason == "length" for o in outs)
    assert stats.peak_kv_pages <= pool
    if decode_reserve == 0.0:
        assert stats.preemptions > 0 and stats.recomputed_tokens > 0
    else:
        assert stats.preemptions == 0 and stats.recomputed_tokens == 0


def test_a_request_that_can_never_fit_fails_alone_with_the_memory_it_needs(tiny_llama_dir, page_bytes):
    """Through Engine: the request's error gives the pages and MiB it needs against the pool's; the rest run."""
    pool = 8
    engine = Engine(tiny_llama_dir, kv_cache_bytes=pool * page_bytes, page_size=PAGE, **CPU)
    prompts = [[1, 5, 6, 7], [1] + list(range(10, 60)), [1, 9, 9]]
    max_tokens = [4, 200, 4]
    outs = engine.generate(prompts, greedy(max_tokens))
    need = pages_for(len(prompts[1]) + 200, PAGE)
    assert [o.finish_reason for o in outs] == ["length", "error", "length"]
    assert f"needs {need} KV pages ({need * page_bytes / 2**20:,.1f} MiB of KV memory)" in outs[1].error
    assert f"whole KV cache is {pool} pages ({pool * page_bytes / 2**20:,.1f} MiB)" in outs[1].error
    assert "kv_cache_bytes" in outs[1].error


def test_the_accessor_gives_the_never_fitting_row_its_error(tiny_llama_dir, page_bytes):
    """pandas: the row too large for the pool (101 prompt tokens + 20 > 10 pages of 8) has the message in its
    error column; the others complete."""
    df = pd.DataFrame({"prompt": pd.Series([[1, 5, 6], [1] + list(range(10, 110)), [1, 7]], dtype=object)})
    out = df.llm.generate("prompt", str(tiny_llama_dir), max_tokens=20, temperature=0.0,
                          kv_cache_bytes=10 * page_bytes, page_size=PAGE, **CPU)
    need = pages_for(101 + 20, PAGE)
    assert out["finish_reason"].tolist() == ["length", "error", "length"]
    assert f"needs {need} KV pages" in out["error"][1] and "MiB of KV memory" in out["error"][1]


# ------------------------------------------------------------------------------------- out of memory

def _refusing(engine: Engine, monkeypatch, refuse) -> tuple[list[int], list[int]]:
    """Make the engine's forward raise torch.OutOfMemoryError where refuse(call number, step inputs) says so.

    Returns (the refused steps' sizes, every forward call's size, refused ones included), filled as it runs.
    """
    real_forward, refused, sizes = engine.runner.forward, [], []

    def forward(inputs, previous):
        sizes.append(inputs.num_tokens)
        if refuse(len(sizes), inputs):
            refused.append(inputs.num_tokens)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_forward(inputs, previous)
    monkeypatch.setattr(engine.runner, "forward", forward)
    return refused, sizes


def test_an_out_of_memory_step_is_retried_smaller_and_counted(tiny_llama_dir, monkeypatch):
    """Two steps fail once each (the first, a prefill, and a later one): each is retried at half its size at
    most, the tokens are an undisturbed run's, and the stats count both retries."""
    prompts, max_tokens = shared_prefix_batch(n=12, seed=1)
    engine = Engine(tiny_llama_dir, kv_cache_bytes=32 << 20, max_num_batched_tokens=256, **CPU)
    want = [o.token_ids for o in engine.generate(prompts, greedy(max_tokens))]
    refused, sizes = _refusing(engine, monkeypatch, lambda call, inputs: call in (1, 6))
    outs = engine.generate(prompts, greedy(max_tokens))
    assert [o.token_ids for o in outs] == want
    assert engine.last_stats.oom_retries == len(refused) == 2
    assert refused == [sizes[0], sizes[5]] and sizes[0] > 32
    for failed in (0, 5):  # the retry carries at most half the tokens (or the smallest budget, 16)
        assert sizes[failed + 1] <= max(16, sizes[failed] // 2)


def test_an_out_of_memory_decode_step_shrinks_below_the_running_decodes(tiny_llama_dir, monkeypatch):
    """40 requests decoding at once and a device that takes at most 24 decode rows a step: the retry must cut the
    decodes too (halving the budget alone would leave a 40-row step failing down to the smallest budget, then
    raising)."""
    prompts, max_tokens = shared_prefix_batch(n=40, seed=2)
    max_tokens = [12] * len(prompts)
    engine = Engine(tiny_llama_dir, kv_cache_bytes=32 << 20, max_num_batched_tokens=512, **CPU)
    want = [o.token_ids for o in engine.generate(prompts, greedy(max_tokens))]
    refused, sizes = _refusing(engine, monkeypatch,
                               lambda call, inputs: inputs.num_decodes == inputs.num_tokens > 24)
    outs = engine.generate(prompts, greedy(max_tokens))
    assert [o.token_ids for o in outs] == want
    assert refused and refused[0] == 40 and engine.last_stats.oom_retries == len(refused) == 1
    assert max(sizes[sizes.index(40) + 1:]) <= 20  # every later step at most half the failed one


def test_out_of_memory_retries_reach_the_workers_engine_stats(tiny_llama_dir, monkeypatch):
    """The pandas path through the process's cached engine: `engine_stats()` (what `client.run` reads on a
    worker) shows the retry, and the rows are an undisturbed run's."""
    options = {"kv_cache_bytes": 16 << 20, "max_num_batched_tokens": 128, **CPU}
    df = pd.DataFrame({"prompt": pd.Series(shared_prefix_batch(n=8, seed=3)[0], dtype=object)})
    want = df.llm.generate("prompt", str(tiny_llama_dir), max_tokens=6, temperature=0.0, **options)
    engine = get_engine(EngineSpec.make(str(tiny_llama_dir), options)).engine
    refused, _ = _refusing(engine, monkeypatch, lambda call, inputs: call == 1)
    got = df.llm.generate("prompt", str(tiny_llama_dir), max_tokens=6, temperature=0.0, **options)
    pd.testing.assert_frame_equal(got, want)
    assert len(refused) == 1 and engine_stats().oom_retries == 1
