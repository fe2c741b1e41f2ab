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
from batchllm_dask.engine import structured
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


def test_parallel_accept_ends_the_same_requests_and_leaves_the_same_masks(tokenizer, monkeypatch):
    """Random allowed tokens, and now and then a refused one (it must end its request in both).  The parallel
    side spreads each grammar over three lexer copies: its rows go to the pool grouped by copy and come back
    in row order."""
    monkeypatch.setattr(structured, "ROWS_PER_LEXER", 8)
    params = params_of(REQUESTS)
    one = compiler_of(tokenizer, parallel_accept=False, lexer_copies=1).start(params)
    parallel = compiler_of(tokenizer, parallel_accept=True, lexer_copies=3, threads=3)
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


def test_lexer_copies_give_the_masks_of_one_lexer(tokenizer, monkeypatch):
    """Requests spread over three compiled copies of each grammar (each with a lexer of its own), their rows
    handed to the executor grouped by copy, get the masks and ends of requests that all share one lexer."""
    monkeypatch.setattr(structured, "ROWS_PER_LEXER", 8)  # 32 requests a grammar: room for 4 copies, 3 allowed
    params = params_of(REQUESTS)
    shared = compiler_of(tokenizer, lexer_copies=1)
    spread = compiler_of(tokenizer, lexer_copies=3, threads=3)
    one, three = shared.start(params), spread.start(params)
    template = spread._templates[next(iter(spread._templates))]
    assert len({id(m) for m in template.copies}) == 3
    rng, alive = random.Random(1), list(params)
    while alive:
        masks = one.fill_mask(alive), three.fill_mask(alive)
        assert torch.equal(*masks)
        tokens = [rng.choice(allowed(masks[0][row])) for row in range(len(alive))]
        ended = one.accept(alive, tokens)
        assert three.accept(alive, tokens) == ended
        alive = [rid for rid in alive if rid not in set(ended)]
    schema_rows = [rid for rid in params if rid % 3 == 0]  # the schema's requests: every third id
    assert sorted(three._copy_of[rid] for rid in schema_rows[:6]) == [0, 0, 1, 1, 2, 2]  # they take turns


def test_a_grammar_gets_copies_by_its_requests(tokenizer):
    """One copy for a grammar with few requests (a job of one grammar per row compiles each once), more as a
    call brings more of its requests, never more than lexer_copies."""
    compiler = compiler_of(tokenizer, lexer_copies=4)
    few = compiler.start({0: SamplingParams(regex=DATE)})
    assert len(compiler._templates[next(iter(compiler._templates))].copies) == 1
    many = compiler.start({rid: SamplingParams(regex=DATE) for rid in range(3 * structured.ROWS_PER_LEXER)})
    assert len(compiler._templates[next(iter(compiler._templates))].copies) == 3
    compiler.start({rid: SamplingParams(regex=DATE) for rid in range(10 * structured.ROWS_PER_LEXER)})
    assert len(compiler._templates[next(iter(compiler._templates))].copies) == 4
    assert few is not None and many is not None


# --------------------------------------------------------------------------- forced runs reused by state

REVIEWISH = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    "sentiment": {"enum": ["positive", "neutral", "negative"]},
    "tags": {"type": "array", "items": {"enum": ["price", "delay", "quality"]}, "maxItems": 2}},
    "required": ["name", "rating", "sentiment", "tags"]}


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE (merges such as ' "' and '":' make forced runs that tokenization can cut)."""
    from batchllm_dask.bench.structured import train_tokenizer
    return train_tokenizer(2048, 2 << 20)


def walk_with_jumps(matchers, params: dict[int, SamplingParams], vocab: int, choose, steps: int = 200):
    """The engine's order (jump_forward, fill_mask, sample, accept), tokens from `choose(step, rid, allowed)`;
    every run, mask row and ended request, in order."""
    alive, trace, rng = list(params), [], random.Random(1)
    for step in range(steps):
        if not alive:
            break
        rows = [(rid, rng.choice([1, 2, 3, 1000]), frozenset({rng.randrange(vocab)})) for rid in alive]
        runs = matchers.jump_forward(rows)
        mask = matchers.fill_mask(alive)
        tokens = [runs[rid][0] if rid in runs else choose(step, rid, allowed(mask[row]))
                  for row, rid in enumerate(alive)]
        ended = matchers.accept(alive, tokens)
        trace.append((sorted(runs.items()), mask.clone(), ended))
        matchers.release(ended)
        alive = [rid for rid in alive if rid not in set(ended)]
    return trace


@pytest.mark.parametrize("spread, max_nodes", [(1, None), (3, None), (2, 60)])
def test_reused_forced_runs_are_those_the_grammar_computes(bpe, spread, max_nodes):
    """Requests that often reach the same states (they pick among the first `spread` allowed tokens, by step
    and request), through matchers that reuse forced runs and masks by state (with a history trie that fills
    up, max_nodes) and matchers that compute every one."""
    kinds = [dict(json_schema=SCHEMA), dict(json_schema=REVIEWISH), dict(regex=DATE),
             dict(choice=["yes-indeed", "no", "not at all"])]
    params = {rid: SamplingParams(**kinds[rid % 4]) for rid in range(48)}

    def choose(step, rid, options):
        return options[random.Random(step * 1000 + rid // 4).randrange(min(spread, len(options)))]
    traces, counts = [], []
    for reuse in (False, True):
        compiler = compiler_of(bpe, reuse_by_state=reuse)
        matchers = compiler.start(params)
        if max_nodes:
            matchers._histories.max_nodes = max_nodes
        traces.append(walk_with_jumps(matchers, params, len(bpe), choose))
        counts.append((matchers.forced_runs_computed, matchers.forced_runs_reused, matchers.tokens_jumped))
    assert len(traces[0]) == len(traces[1])
    for (runs0, mask0, ended0), (runs1, mask1, ended1) in zip(*traces):
        assert runs0 == runs1 and ended0 == ended1
        assert torch.equal(mask0, mask1)
    (computed0, reused0, jumped0), (computed1, reused1, jumped1) = counts
    assert reused0 == 0 and reused1 > 0 and computed1 + reused1 == computed0  # the same rows asked
    assert jumped0 == jumped1 > 0


def test_a_full_history_trie_names_new_states_apart():
    """Past max_nodes a new state gets a node of its own: never one another history reaches."""
    from batchllm_dask.engine.structured import TokenHistories
    histories = TokenHistories(max_nodes=3)
    template = object()
    root = histories.root(template)
    a = histories.walk(root, [1, 2, 3])  # three edges: full
    assert histories.walk(root, [1, 2, 3]) == a and not histories.shared()
    b, c = histories.walk(root, [1, 2, 4]), histories.walk(root, [1, 2, 4])
    assert len({a, b, c}) == 3  # the same new history twice: two nodes, as if two states
    assert histories.walk(root, [1, 2]) == histories.walk(root, [1, 2])
