"""Jump-forward (engine/jump_forward.py): a grammar's forced runs join the request as one chunk.

The grammar side on the embedded byte tokenizer (every forced byte is a forced token), the engine side on
the tiny random model, whose greedy tokens must not change: llguidance's masks allow only the canonical
tokenization of forced text, so a forced run is what token-by-token decoding would have produced.
"""
from __future__ import annotations

import json

import pytest
import torch

from batchllm_dask.engine import Engine, SamplingParams
from batchllm_dask.engine.default_model import build_tokenizer
from batchllm_dask.engine.jump_forward import run_room
from batchllm_dask.engine.sequence import RequestSeq, Status
from batchllm_dask.engine.structured import GrammarCompiler
from _helpers import DATE, SCHEMA, assert_valid

ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 32 << 20, "min_shared_tokens": 16}
LONG_KEY = {"type": "object", "properties": {"the_number_of_stars_this_review_gives": {"type": "integer"}},
            "required": ["the_number_of_stars_this_review_gives"]}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def allowed(row: torch.Tensor) -> list[int]:
    return [t for t in range(32 * row.shape[0]) if (int(row[t // 32]) >> (t % 32)) & 1]


# --------------------------------------------------------------------------- the grammar side

def test_a_forced_run_is_consumed_and_its_first_token_is_the_only_one_the_row_allows(tokenizer, compiler):
    matchers = compiler.start({3: SamplingParams(json_schema=LONG_KEY)})
    runs = matchers.jump_forward([(3, 1000, frozenset())])
    key, forced = '{"the_number_of_stars_this_review_gives":', tokenizer.decode(runs[3])
    assert forced == (key + " ")[:len(forced)] and len(forced) >= len(key) - 1  # the key, to its colon or so
    mask = matchers.fill_mask([3])
    assert allowed(mask[0]) == [runs[3][0]]
    assert matchers.masks_computed == 0 and matchers.tokens_jumped == len(runs[3]) - 1
    assert matchers.accept([3], [runs[3][0]]) == []  # pre-accepted: checked, not consumed again
    # the grammar goes on from the end of the whole run: finish the object with allowed tokens
    text, preferred = tokenizer.decode(runs[3]), encode(tokenizer, '}:7')
    for _ in range(20):
        options = allowed(matchers.fill_mask([3])[0])
        token = next(t for t in preferred + options if t in options)
        text += tokenizer.decode([token])
        if matchers.accept([3], [token]):
            break
    assert json.loads(text) == {"the_number_of_stars_this_review_gives": 7}


def test_a_run_is_cut_by_its_room_and_before_a_stop_id(tokenizer, compiler):
    matchers = compiler.start({0: SamplingParams(json_schema=LONG_KEY), 1: SamplingParams(json_schema=LONG_KEY),
                               2: SamplingParams(json_schema=LONG_KEY)})
    underscore = encode(tokenizer, "_")[0]
    runs = matchers.jump_forward([(0, 5, frozenset()), (1, 1000, frozenset({underscore})), (2, 0, frozenset())])
    assert tokenizer.decode(runs[0]) == '{"the'
    assert tokenizer.decode(runs[1]) == '{"the'  # stops before the first "_"
    assert 2 not in runs


def test_a_run_never_takes_the_token_that_completes_the_grammar(tokenizer, compiler):
    matchers = compiler.start({0: SamplingParams(choice=["yes-indeed"])})
    runs = matchers.jump_forward([(0, 1000, frozenset())])
    assert tokenizer.decode(runs[0]) == "yes-indee"  # the last "d" is sampled: it ends the request
    assert matchers.accept([0], [runs[0][0]]) == []
    (last,) = allowed(matchers.fill_mask([0])[0])
    assert matchers.accept([0], [last]) == [0]


def test_a_sample_that_disagrees_with_the_pre_accepted_token_ends_the_grammar(tokenizer, compiler):
    matchers = compiler.start({0: SamplingParams(json_schema=LONG_KEY)})
    runs = matchers.jump_forward([(0, 1000, frozenset())])
    assert matchers.accept([0], [runs[0][0] + 1]) == [0]


def seq(tokens: int, prompt: int, max_tokens: int, pages: int, reserved: int = 0, **params) -> RequestSeq:
    s = RequestSeq(start=0, tokens=[1] * tokens, parent=None, rank=0, num_prompt=prompt,
                   params=SamplingParams(max_tokens=max_tokens, **params))
    s.pages, s.reserved_pages, s.status = list(range(pages)), reserved, Status.RUNNING
    return s


def test_the_room_keeps_a_sampled_token_of_max_tokens_and_the_context_and_stays_in_its_pages():
    # 10 prompt + 3 output tokens (the last a placeholder at 12), max_tokens 8: 4 more may join, then one sampled
    assert run_room(seq(13, 10, 8, pages=4), 12, max_model_len=100, page_size=16) == 1 + 4
    # the sampled token after the run must fit the context: at most at position max_model_len - 1
    assert run_room(seq(13, 10, 8, pages=4), 12, max_model_len=17, page_size=16) == 1 + 3
    assert run_room(seq(13, 10, 8, pages=4), 12, max_model_len=16, page_size=16) == 1 + 2
    assert run_room(seq(13, 10, 50, pages=1), 12, max_model_len=100, page_size=16) == 1 + 3  # its one page
    assert run_room(seq(13, 10, 50, pages=1, reserved=1), 12, max_model_len=100, page_size=16) == 1 + 19
    assert run_room(seq(13, 10, 4, pages=1), 12, max_model_len=100, page_size=16) == 1  # one token left to sample
    assert run_room(seq(13, 10, 3, pages=1), 12, max_model_len=100, page_size=16) == 1  # its last (draining)


def test_no_room_when_draining_with_stop_strings_or_not_at_its_placeholder():
    draining = seq(13, 10, 8, pages=4)
    draining.status = Status.DRAINING
    assert run_room(draining, 12, 100, 16) == 0
    assert run_room(seq(13, 10, 8, pages=4, stop=["}"]), 12, 100, 16) == 0
    assert run_room(seq(13, 10, 8, pages=4), 11, 100, 16) == 0


# --------------------------------------------------------------------------- the engine side

@pytest.fixture(scope="module")
def engines(tiny_llama_dir):
    return Engine(tiny_llama_dir, **ENGINE), Engine(tiny_llama_dir, **ENGINE, jump_forward=False)


def prompts(n: int) -> list[str]:
    return ["Answer in the format asked for. Item " + "x" * (i % 5) + f" number {i}:" for i in range(n)]


@pytest.mark.parametrize("constraint", [dict(json_schema=SCHEMA), dict(json_schema=LONG_KEY), dict(regex=DATE)])
def test_greedy_tokens_are_those_of_token_by_token_decoding_in_fewer_steps(engines, constraint):
    jumping, stepping = engines
    params = SamplingParams(max_tokens=120, temperature=0.0, **constraint)
    fast, slow = jumping.generate(prompts(6), params), stepping.generate(prompts(6), params)
    assert [o.token_ids for o in fast] == [o.token_ids for o in slow]
    for out in fast:
        assert out.finish_reason == "stop"
        assert_valid(out.text, params)
    if "json_schema" in constraint:  # a date has no forced run longer than its dashes
        assert jumping.last_stats.steps < stepping.last_stats.steps


def test_seeded_sampled_rows_are_valid_and_reproducible(engines):
    jumping, _ = engines
    params = [SamplingParams(max_tokens=120, temperature=1.0, seed=s, json_schema=SCHEMA) for s in range(6)]
    first, again = jumping.generate(prompts(6), params), jumping.generate(prompts(6), params)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    for out, p in zip(first, params):
        assert_valid(out.text, p)


@pytest.mark.parametrize("max_tokens", [1, 2, 5, 17])
def test_max_tokens_cuts_a_forced_run_exactly_where_token_by_token_decoding_does(engines, max_tokens):
    jumping, stepping = engines
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, json_schema=LONG_KEY)
    fast, slow = jumping.generate(prompts(3), params), stepping.generate(prompts(3), params)
    for f, s in zip(fast, slow):
        assert f.token_ids == s.token_ids and len(f.token_ids) == max_tokens
        assert f.finish_reason == s.finish_reason == "length"


def test_unconstrained_rows_beside_jumping_ones_are_unchanged(engines):
    jumping, _ = engines
    plain = SamplingParams(max_tokens=16, temperature=0.0)
    alone = jumping.generate(prompts(4), plain)
    mixed = jumping.generate(prompts(4), [plain, SamplingParams(max_tokens=120, json_schema=LONG_KEY)] * 2)
    assert [mixed[i].token_ids for i in (0, 2)] == [alone[i].token_ids for i in (0, 2)]


@pytest.mark.parametrize("budget", [24, 28])
def test_forced_chunks_split_by_a_small_token_budget_give_the_same_tokens(tiny_llama_dir, budget):
    """A forced run longer than what the step budget leaves is computed over several steps, its last token
    possibly as a decode (budget 28 leaves one: before c301282 both scheduler passes took it, and the grammar
    saw the request twice in one step): the tokens are still those of token-by-token decoding."""
    small = {**ENGINE, "max_num_batched_tokens": budget}
    jumping, stepping = Engine(tiny_llama_dir, **small), Engine(tiny_llama_dir, **small, jump_forward=False)
    params = SamplingParams(max_tokens=60, temperature=0.0, json_schema=LONG_KEY)
    fast, slow = jumping.generate(prompts(6), params), stepping.generate(prompts(6), params)
    assert [(o.token_ids, o.finish_reason) for o in fast] == [(o.token_ids, o.finish_reason) for o in slow]
    assert jumping.last_stats.steps < stepping.last_stats.steps


def test_jumps_under_preemption_give_the_same_tokens(tiny_llama_dir):
    """A small pool with no decode reserve preempts and recomputes requests, forced tokens included."""
    tight = {**ENGINE, "kv_cache_bytes": None, "decode_reserve": 0.0}
    page = Engine(tiny_llama_dir, **ENGINE)._page_bytes()
    tight["kv_cache_bytes"] = 40 * page  # 640 tokens for 8 requests of some 50 prompt and up to 80 output tokens
    jumping, stepping = Engine(tiny_llama_dir, **tight), Engine(tiny_llama_dir, **tight, jump_forward=False)
    params = SamplingParams(max_tokens=80, temperature=0.0, json_schema=SCHEMA)
    fast, slow = jumping.generate(prompts(8), params), stepping.generate(prompts(8), params)
    assert jumping.last_stats.preemptions > 0
    assert [(o.token_ids, o.finish_reason) for o in fast] == [(o.token_ids, o.finish_reason) for o in slow]
