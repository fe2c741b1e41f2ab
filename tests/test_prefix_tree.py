"""The global prefix tree: what it shares, and that its accounting is exact."""
from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm_dask.engine.prefix_tree import PrefixPlan, build_prefix_plan
from _helpers import trie_count


def _three_level_prompts(rng: random.Random) -> list[list[int]]:
    """[system][document][question] prompts; questions start with distinct tokens."""
    prompts, first = [], iter(range(1000, 100000))
    for _ in range(2):
        system = [rng.randrange(1, 50) for _ in range(rng.randrange(40, 80))]
        for _ in range(3):
            doc = [rng.randrange(50, 100) for _ in range(rng.randrange(30, 90))]
            for _ in range(rng.randrange(2, 5)):
                prompts.append(system + doc + [next(first)] + [rng.randrange(1, 100) for _ in range(rng.randrange(0, 9))])
    rng.shuffle(prompts)
    return prompts


def test_three_levels_are_found_and_nested():
    prompts = _three_level_prompts(random.Random(1))
    plan = build_prefix_plan(prompts, min_shared_tokens=1)
    for i, prompt in enumerate(prompts):
        chain = plan.chain(i)
        assert len(chain) == 2, "system prompt, then document"
        outer, inner = (plan.prefixes[c] for c in chain)
        assert outer.start == 0 and inner.start == outer.end
        assert list(outer.tokens + inner.tokens) == prompt[:inner.end]


def test_computed_tokens_equal_distinct_trie_tokens():
    prompts = _three_level_prompts(random.Random(2))
    plan = build_prefix_plan(prompts, min_shared_tokens=1)
    assert plan.computed_prompt_tokens([len(p) for p in prompts]) == trie_count(prompts)


def test_unshared_plan_computes_every_token():
    prompts = _three_level_prompts(random.Random(3))
    plan = PrefixPlan.unshared(len(prompts))
    assert plan.computed_prompt_tokens([len(p) for p in prompts]) == sum(map(len, prompts))


def test_threshold_skips_prefixes_that_do_not_pay():
    prompts = [[1, 2, 3, 10], [1, 2, 3, 11], [7] * 50 + [1], [7] * 50 + [2]]
    plan = build_prefix_plan(prompts, min_shared_tokens=10)
    assert [p.tokens for p in plan.prefixes] == [tuple([7] * 50)]
    assert plan.request_prefix[0] is None and plan.request_prefix[2] == 0


def test_a_request_keeps_its_last_token():
    # The second prompt is the first one plus more: the first must still compute its last token.
    base = list(range(1, 60))
    prompts = [base, base + [99, 98], base + [97]]
    plan = build_prefix_plan(prompts, min_shared_tokens=1)
    for i, p in enumerate(prompts):
        assert plan.suffix_start(i) <= len(p) - 1


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=12), min_size=1, max_size=25),
       st.integers(1, 8))
def test_plan_is_consistent_for_any_batch(prompts, threshold):
    plan = build_prefix_plan(prompts, threshold)
    for i, prompt in enumerate(prompts):
        context = [t for c in plan.chain(i) for t in plan.prefixes[c].tokens]
        assert context == prompt[:len(context)], "a request's shared context is its own prompt's prefix"
        assert plan.suffix_start(i) == len(context) < len(prompt)
    for p in plan.prefixes:
        users = sum(p.id in plan.chain(i) for i in range(len(prompts)))
        assert users == p.num_requests >= 2
        assert (p.num_requests - 1) * len(p.tokens) >= threshold
    if threshold == 1:
        assert plan.computed_prompt_tokens([len(p) for p in prompts]) <= sum(map(len, prompts))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(-2**63, 2**63 - 1) | st.integers(0, 3), max_size=12), min_size=1, max_size=30))
def test_the_byte_sort_key_orders_prompts_as_their_id_lists(prompts):
    """The prompts' order by `sort_key` is their order as Python lists of ids (ties kept in place)."""
    from batchllm_dask.engine.prefix_tree import sort_key
    keys = [sort_key(np.asarray(p, dtype=np.int64)) for p in prompts]
    assert sorted(range(len(prompts)), key=keys.__getitem__) == sorted(range(len(prompts)), key=lambda i: prompts[i])
