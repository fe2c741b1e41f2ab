"""Sampling (greedy, top-k, top-p, seeded Gumbel-max) and stop checks."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm_dask.engine.config import SamplingParams
from batchllm_dask.engine.loader import eos_token_ids, load_tokenizer
from batchllm_dask.engine.sampler import (SamplingBatch, StopChecker, StopDecision, _mix64, hash_uniform,
                                          sample)

V = 50


def batch_of(params: list[SamplingParams], seeds: list[int] | None = None,
             steps: list[int] | None = None) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(params, seeds or list(range(n)), steps or [0] * n, "cpu")


def random_logits(rows: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits(8)
    batch = batch_of([SamplingParams(temperature=0.0)] * 8)
    assert batch.all_greedy
    assert torch.equal(sample(logits, batch), logits.argmax(-1))


def test_bfloat16_logits_sample_as_their_float32_copy():
    """The model hands bfloat16 logits to the sampler unwidened: every row, greedy (ties included: a bfloat16
    row has many) or seeded with top-k/top-p, gets the token its float32 copy would get."""
    logits = (random_logits(12, seed=3, vocab=4096) * 4).to(torch.bfloat16)
    assert (logits[0].float().unique().numel() < 4096), "the test wants tied values"
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, seed=5),
              SamplingParams(temperature=1.3, top_k=40, top_p=0.9, seed=9)] * 4
    batch = batch_of(params, seeds=list(range(12)), steps=list(range(12)))
    assert torch.equal(sample(logits, batch), sample(logits.float(), batch))
    greedy = batch_of([SamplingParams(temperature=0.0)] * 12)
    assert torch.equal(sample(logits, greedy), logits.float().argmax(-1))


def test_top_k_1_is_greedy_in_a_mixed_batch():
    logits = random_logits(6)
    params = [SamplingParams(top_k=1, temperature=1.5), SamplingParams(temperature=1.0)] * 3
    out = sample(logits, batch_of(params))
    assert torch.equal(out[0::2], logits[0::2].argmax(-1))


def test_splitmix64_matches_python_reference():
    """The int64 tensor hash is the textbook unsigned splitmix64 finaliser (same bits on any device)."""
    def mix(z: int) -> int:
        m = (1 << 64) - 1
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)
    values = [0, 1, 12345, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, 0x9E3779B97F4A7C15]
    signed = torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in values], dtype=torch.int64)
    got = [int(x) & ((1 << 64) - 1) for x in _mix64(signed).tolist()]
    assert got == [mix(v) for v in values]


def test_uniforms_are_uniform():
    u = hash_uniform(torch.tensor([7]), torch.tensor([3]), 200_000)[0]
    assert 0 < u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), top_k=st.integers(1, V + 5), top_p=st.floats(0.01, 1.0),
       temperature=st.floats(0.05, 5.0), step=st.integers(0, 1000))
def test_top_k_top_p_stay_in_the_allowed_set(seed, top_k, top_p, temperature, step):
    logits = random_logits(4, seed)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    out = sample(logits, batch_of([params] * 4, seeds=[seed + i for i in range(4)], steps=[step] * 4))
    for row, token in zip(logits, out.tolist()):
        order = row.argsort(descending=True, stable=True).tolist()[:top_k]
        probs = (row[order] / temperature).softmax(-1)  # renormalised over the top k
        mass_before = (probs.cumsum(0) - probs).tolist()
        allowed = {t for r, t in enumerate(order) if r == 0 or top_p == 1.0 or mass_before[r] < top_p + 1e-5}
        assert token in allowed


def test_top_p_keeps_the_best_token_when_it_alone_exceeds_p():
    logits = torch.full((1, V), -10.0)
    logits[0, 17] = 10.0
    for step in range(20):
        assert sample(logits, batch_of([SamplingParams(top_p=0.01)], steps=[step])).item() == 17


def test_seeded_rows_independent_of_batch_composition_and_order():
    params = [SamplingParams(temperature=1.0, top_p=0.9), SamplingParams(temperature=0.7, top_k=10),
              SamplingParams(temperature=0.0), SamplingParams(temperature=2.0)]
    logits = random_logits(4, seed=5)
    seeds, steps = [11, 22, 33, 44], [0, 5, 9, 2]
    alone = [sample(logits[i:i + 1], batch_of([params[i]], [seeds[i]], [steps[i]])).item() for i in range(4)]
    perm = [2, 0, 3, 1]
    shuffled = sample(logits[perm], batch_of([params[i] for i in perm], [seeds[i] for i in perm],
                                             [steps[i] for i in perm]))
    assert [alone[i] for i in perm] == shuffled.tolist()
    filler = random_logits(3, seed=9)  # unrelated greedy and sampled rows around them
    mixed = torch.cat([filler[:2], logits, filler[2:]])
    mixed_params = [SamplingParams(temperature=0.0), SamplingParams(top_k=3), *params, SamplingParams()]
    out = sample(mixed, batch_of(mixed_params, [1, 2, *seeds, 3], [4, 4, *steps, 4]))
    assert out[2:6].tolist() == alone


def test_different_seeds_and_steps_differ():
    logits = torch.zeros(64, V)  # uniform: the token is the noise's argmax
    params = [SamplingParams(temperature=1.0)] * 64
    by_seed = sample(logits, batch_of(params, seeds=list(range(64)), steps=[0] * 64))
    by_step = sample(logits, batch_of(params, seeds=[0] * 64, steps=list(range(64))))
    assert len(set(by_seed.tolist())) > 20 and len(set(by_step.tolist())) > 20
    again = sample(logits, batch_of(params, seeds=list(range(64)), steps=[0] * 64))
    assert torch.equal(by_seed, again)


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4).contiguous()
    out = sample(logits, batch_of([SamplingParams(temperature=1.0)] * 4000, seeds=list(range(4000))))
    freq = torch.bincount(out, minlength=4).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_temperature_to_zero_is_greedy():
    logits = random_logits(32, seed=3)
    out = sample(logits, batch_of([SamplingParams(temperature=1e-4)] * 32, seeds=list(range(32))))
    assert torch.equal(out, logits.argmax(-1))
    tiny = batch_of([SamplingParams(temperature=1e-30, top_p=0.5)] * 32)
    assert tiny.all_greedy and torch.equal(sample(logits, tiny), logits.argmax(-1))


# ------------------------------------------------------------------------------------------------ stops

@pytest.fixture(scope="module")
def checker(tiny_llama_dir) -> StopChecker:
    tok = load_tokenizer(tiny_llama_dir)
    return StopChecker(tok, eos_token_ids(tiny_llama_dir, tok))


def feed(checker: StopChecker, params: SamplingParams, token_ids: list[int]) -> tuple[StopDecision, int]:
    """Check after each token, as the engine does; the decision and the number of tokens taken."""
    for n in range(1, len(token_ids) + 1):
        decision = checker.check(token_ids[:n], params)
        if decision.finished:
            return decision, n
    return decision, len(token_ids)


def encode(checker: StopChecker, text: str) -> list[int]:
    return checker.tokenizer.encode(text, add_special_tokens=False)


def test_stop_string_straddling_tokens_is_removed(checker):
    ids = encode(checker, "Hello world. STOP here and more")
    finish, n = feed(checker, SamplingParams(max_tokens=100, stop=("STOP",)), ids)
    assert finish == StopDecision(True, "stop", "Hello world. ", "STOP")
    assert n == len(encode(checker, "Hello world. STOP"))  # found on the token completing it


def test_stop_string_inside_a_multibyte_character(checker):
    ids = encode(checker, "price: 5€ total")  # '€' is three byte tokens
    finish, _ = feed(checker, SamplingParams(max_tokens=100, stop=["€"]), ids)
    assert finish == StopDecision(True, "stop", "price: 5", "€")


def test_earliest_stop_string_wins(checker):
    ids = encode(checker, "abcdef")
    finish, _ = feed(checker, SamplingParams(max_tokens=100, stop=["cdef", "de"]), ids)
    assert finish.text == "abc" and finish.matched == "de"


def test_eos_stops_unless_ignored(checker):
    eos = checker.tokenizer.eos_token_id
    ids = encode(checker, "hi") + [eos] + encode(checker, "there")
    finish, n = feed(checker, SamplingParams(max_tokens=100), ids)
    assert (finish, n) == (StopDecision(True, "stop", "hi", eos), 3)
    finish, n = feed(checker, SamplingParams(max_tokens=6, ignore_eos=True), ids)
    assert (finish, n) == (StopDecision(True, "length", "hithe"), 6)


def test_stop_token_ids(checker):
    ids = encode(checker, "one;two")
    finish, n = feed(checker, SamplingParams(max_tokens=100, stop_token_ids=(ord(";"),)), ids)
    assert finish.reason == "stop" and finish.matched == ord(";") and n == 4
    assert finish.text == "one;"  # the stop token stays (not special)


def test_max_tokens_is_length(checker):
    finish, n = feed(checker, SamplingParams(max_tokens=3), encode(checker, "abcdef"))
    assert (finish, n) == (StopDecision(True, "length", "abc"), 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_tokens_on_cpu_and_cuda():
    params = [SamplingParams(temperature=t, top_p=p, top_k=k)
              for t in (0.0, 0.5, 1.0, 1.7) for p in (1.0, 0.8) for k in (-1, 20)]
    logits = random_logits(len(params), seed=4, vocab=32000)
    seeds, steps = list(range(100, 100 + len(params))), list(range(len(params)))
    cpu = sample(logits, batch_of(params, seeds, steps))
    gpu = sample(logits.cuda(), SamplingBatch.build(params, seeds, steps, "cuda"))
    assert torch.equal(hash_uniform(torch.tensor(seeds), torch.tensor(steps), 32000),
                       hash_uniform(torch.tensor(seeds).cuda(), torch.tensor(steps).cuda(), 32000).cpu())
    assert torch.equal(cpu, gpu.cpu())


def test_stop_string_after_a_long_completion(checker):
    text = "lorem ipsum " * 40 + "the END is here"
    finish, n = feed(checker, SamplingParams(max_tokens=1000, stop=["END"]), encode(checker, text))
    assert finish == StopDecision(True, "stop", "lorem ipsum " * 40 + "the ", "END")
    assert n == len(encode(checker, text[:text.index("END") + 3]))


def test_running_until_finished(checker):
    decision = checker.check(encode(checker, "abc"), SamplingParams(max_tokens=10, stop=["zz"]))
    assert decision == StopDecision(False) and not decision.finished and decision.reason is None
