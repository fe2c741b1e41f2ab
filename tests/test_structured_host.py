"""The grammar's host-time shortcuts (engine/structured.py) change nothing the grammar decides.

On the embedded byte tokenizer: two GrammarMatchers over the same requests and tokens, one with a shortcut
and one without, must agree on every mask, every forced run and every ended request.
"""
from __future__ import annotations

import random

import pytest
import torch

from batchllm_dask.engine import SamplingParams
from batchllm_dask.engine.default_model import build_tokenizer
from batchllm_dask.engine.structured import PARALLEL_ACCEPT_MIN_ROWS, GrammarCompiler
from _helpers import DATE, SCHEMA

REQUESTS = PARALLEL_ACCEPT_MIN_ROWS + 32


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def compiler_of(tokenizer, **settings) -> GrammarCompiler:
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    for name, value in settings.items():
        setattr(compiler, name, value)
    return compiler


def allowed(row: torch.Tensor) -> list[int]:
    bits = row.numpy().view("uint8")
    return [t for t in range(8 * bits.size) if (bits[t >> 3] >> (t & 7)) & 1]


def params_of(n: int) -> dict[int, SamplingParams]:
    kinds = [dict(json_schema=SCHEMA), dict(regex=DATE), dict(choice=["yes", "no", "maybe so"])]
    return {rid: SamplingParams(**kinds[rid % 3]) for rid in range(n)}


def test_parallel_accept_ends_the_same_requests_and_leaves_the_same_masks(tokenizer):
    """Random allowed tokens, and now and then a refused one (it must end its request in both)."""
    params = params_of(REQUESTS)
    one = compiler_of(tokenizer, parallel_accept=False).start(params)
    parallel = compiler_of(tokenizer, parallel_accept=True)
    two = parallel.start(params)
    calls = []
    real = parallel.executor.consume_token_par

    class Spy:  # LLExecutor's attributes are read-only: wrap it
        unsafe_compute_mask_ptr = parallel.executor.unsafe_compute_mask_ptr

        def consume_token_par(self, rows):
            calls.append(len(rows))
            return real(rows)
    parallel._executor = Spy()
    rng, alive, steps = random.Random(0), list(params), 0
    while alive:
        masks = one.fill_mask(alive), two.fill_mask(alive)
        assert torch.equal(*masks)
        tokens = []
        for row in range(len(alive)):
            options = allowed(masks[0][row])
            refused = [t for t in range(len(tokenizer)) if t not in options]
            tokens.append(rng.choice(refused) if refused and rng.random() < 0.02 else rng.choice(options))
        ended = one.accept(alive, tokens)
        assert two.accept(alive, tokens) == ended
        one.release(ended)
        two.release(ended)
        alive = [rid for rid in alive if rid not in set(ended)]
        steps += 1
    assert steps > 3 and calls and min(calls) >= PARALLEL_ACCEPT_MIN_ROWS  # the parallel path did run
