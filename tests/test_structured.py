"""Structured output without the engine: constraint fields, grammar masks, the mask in the sampler, typed columns."""
from __future__ import annotations

import enum
import json
import pickle
from typing import Literal, Optional

import pandas as pd
import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm_dask.engine.config import SamplingParams
from batchllm_dask.engine.constraints import closed_objects
from batchllm_dask.engine.default_model import build_tokenizer
from batchllm_dask.engine.sampler import SamplingBatch, apply_token_mask, sample
from batchllm_dask.engine.structured import GrammarCompiler
from batchllm_dask.json_columns import add_field_columns, check_field_names, column_dtypes
from _helpers import DATE, SCHEMA, assert_valid

CHOICES = ["yes", "no", "not sure"]


class Label(enum.Enum):
    GOOD = "good"
    BAD = "bad"


class Inner(pydantic.BaseModel):
    x: int


class Review(pydantic.BaseModel):
    rating: int
    price: float
    verified: bool
    title: str
    tone: Literal["warm", "cold"]
    label: Label
    votes: Optional[int] = None
    tags: list[str]
    inner: Inner


# --------------------------------------------------------------------------- SamplingParams fields

@pytest.mark.parametrize("field, value", [
    ("json_schema", {"type": "objectx"}), ("json_schema", 3), ("json_schema", "{not json"),
    ("json_schema", {"type": "string", "format": "no-such-format"}),
    ("regex", "[0-9"), ("regex", ""), ("regex", 5),
    ("choice", []), ("choice", "yes"), ("choice", ["a", ""]), ("choice", ["a", "a"]), ("choice", [1, 2])])
def test_a_bad_constraint_is_a_value_error_naming_its_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**{field: value})


def test_at_most_one_constraint():
    with pytest.raises(ValueError, match="json_schema, choice: give at most one"):
        SamplingParams(json_schema=SCHEMA, choice=["a"])


def test_constrained_params_stay_hashable_picklable_and_small():
    from_dict, from_model = SamplingParams(json_schema=Review.model_json_schema()), SamplingParams(json_schema=Review)
    assert from_dict == from_model and hash(from_dict) == hash(from_model)
    assert json.loads(from_model.json_schema) == Review.model_json_schema()
    for params in (from_model, SamplingParams(regex=DATE), SamplingParams(choice=CHOICES)):
        assert pickle.loads(pickle.dumps(params)) == params
        assert len(pickle.dumps(params)) < 2000
    assert SamplingParams(choice=["a", "b"]).constraint == ("choice", ("a", "b"))
    assert SamplingParams().constraint is None


def test_objects_are_closed_only_where_the_schema_is_silent():
    schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {}},
                                                "open": {"type": "object", "properties": {}, "additionalProperties": True},
                                                "e": {"enum": [{"properties": {}}]}},
              "$defs": {"D": {"properties": {"a": {}}}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert set(closed["properties"]) == {"properties", "open", "e"}
    assert closed["properties"]["open"]["additionalProperties"] is True
    assert closed["properties"]["e"]["enum"] == [{"properties": {}}]  # data, not a schema
    assert closed["$defs"]["D"]["additionalProperties"] is False
    assert schema.get("additionalProperties") is None  # a copy


# --------------------------------------------------------------------------- apply_token_mask

def random_mask(rows: int, vocab: int, seed: int, density: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 bitmask [rows, ceil(vocab/32)], the bool [rows, vocab] it encodes); every row allows a token."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(rows, vocab, generator=g) < density
    allowed[torch.arange(rows), torch.randint(vocab, (rows,), generator=g)] = True
    padded = torch.zeros(rows, 32 * ((vocab + 31) // 32), dtype=torch.int64)
    padded[:, :vocab] = allowed.long()
    words = (padded.view(rows, -1, 32) << torch.arange(32)).sum(-1)
    return (words - (words >= 1 << 31) * (1 << 32)).to(torch.int32), allowed


@pytest.mark.parametrize("vocab", [1, 31, 32, 70, 259])
def test_apply_token_mask_sets_exactly_the_masked_tokens_to_minus_inf(vocab):
    mask, allowed = random_mask(5, vocab, seed=vocab)
    logits = torch.randn(5, vocab)
    out = apply_token_mask(logits, mask)
    assert torch.equal(torch.isfinite(out), allowed)
    assert torch.equal(out[allowed], logits[allowed])


def test_apply_token_mask_checks_the_mask_shape():
    with pytest.raises(ValueError, match="mask must be int32"):
        apply_token_mask(torch.zeros(2, 64), torch.zeros(2, 3, dtype=torch.int32))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.sampled_from([0.0, 0.7, 1.0, 1.5]),
       top_k=st.sampled_from([-1, 5]), top_p=st.sampled_from([1.0, 0.8]))
def test_masked_sampling_picks_only_allowed_tokens_greedy_and_sampled(seed, temperature, top_k, top_p):
    params = [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)] * 6
    mask, allowed = random_mask(6, 70, seed, density=0.05)
    logits = torch.randn(6, 70, generator=torch.Generator().manual_seed(seed)) * 3
    tokens = sample(apply_token_mask(logits, mask), SamplingBatch.build(params, [seed] * 6, list(range(6))))
    assert allowed[torch.arange(6), tokens].all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), temperature=st.sampled_from([0.0, 0.8, 1.3]))
def test_a_mask_that_allows_the_unmasked_token_does_not_change_it(seed, temperature):
    """Masking changes nothing but the masked tokens: where the plain sample is allowed, it is kept."""
    params = [SamplingParams(temperature=temperature, seed=seed)] * 8
    batch = SamplingBatch.build(params, list(range(seed, seed + 8)), [seed % 7] * 8)
    logits = torch.randn(8, 70, generator=torch.Generator().manual_seed(seed)) * 3
    plain = sample(logits, batch)
    mask, allowed = random_mask(8, 70, seed + 1, density=0.5)
    masked = sample(apply_token_mask(logits, mask), batch)
    kept = allowed[torch.arange(8), plain]
    assert torch.equal(masked[kept], plain[kept])
    full = torch.full_like(mask, -1)
    assert torch.equal(sample(apply_token_mask(logits, full), batch), plain)


# --------------------------------------------------------------------------- grammar matchers

@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def decode_under_masks(compiler, params: dict[int, SamplingParams], vocab: int, seed: int, limit: int = 120):
    """Random logits, masked and sampled like the engine does, until each grammar ends or EOS comes."""
    eos = compiler.eos_token_ids[0]
    matchers = compiler.start(params)
    outputs: dict[int, list[int]] = {rid: [] for rid in params}
    alive, g = list(params), torch.Generator().manual_seed(seed)
    while alive:
        logits = torch.randn(len(alive), vocab, generator=g) * 4
        mask = matchers.fill_mask(alive)
        if mask is not None:
            logits = apply_token_mask(logits, mask)
        batch = SamplingBatch.build([params[r] for r in alive], [params[r].seed or r for r in alive],
                                    [len(outputs[r]) for r in alive])
        tokens = sample(logits, batch).tolist()
        ended = set(matchers.accept(alive, tokens))
        for rid, token in zip(alive, tokens):
            outputs[rid].append(token)
        alive = [r for r, t in zip(alive, tokens) if r not in ended and t != eos and len(outputs[r]) < limit]
    return outputs


def test_every_output_decoded_under_its_mask_is_valid(tokenizer):
    """Greedy and seeded sampled rows, each constraint kind, beside unconstrained rows of the same steps."""
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    kinds = [dict(json_schema=SCHEMA), dict(regex=DATE), dict(choice=CHOICES), {}]
    params = {rid: SamplingParams(**kinds[rid % 4], temperature=[0.0, 1.0, 1.3][rid % 3], seed=rid)
              for rid in range(24)}
    outputs = decode_under_masks(compiler, params, len(tokenizer), seed=1)
    for rid, tokens in outputs.items():
        if params[rid].constraint is not None:
            assert_valid(tokenizer.decode(tokens, skip_special_tokens=True), params[rid])


def test_pydantic_model_outputs_validate(tokenizer):
    class Small(pydantic.BaseModel):
        tone: Literal["warm", "cold"]
        label: Label
        stars: int = pydantic.Field(ge=1, le=5)
        fine: Optional[bool] = None
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    params = {rid: SamplingParams(json_schema=Small, temperature=1.0, seed=rid) for rid in range(8)}
    for tokens in decode_under_masks(compiler, params, len(tokenizer), seed=2).values():
        Small.model_validate_json(tokenizer.decode(tokens, skip_special_tokens=True))


def test_no_constraint_builds_nothing(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    assert compiler.start({0: SamplingParams(), 1: SamplingParams(temperature=0)}) is None
    assert compiler._tokenizer is None  # the ~2 s llguidance tokenizer of a large vocabulary is never built


def test_a_grammar_that_cannot_continue_ends_at_its_last_token(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    matchers = compiler.start({7: SamplingParams(choice=["yes", "yellow"])})
    for i, token in enumerate(tokenizer.encode("yes", add_special_tokens=False)):
        assert matchers.fill_mask([7]) is not None
        assert matchers.accept([7], [token]) == ([7] if i == 2 else [])


def test_an_open_ended_grammar_allows_eos_once_complete(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    matchers = compiler.start({0: SamplingParams(regex="[0-9]+")})
    assert not bit(matchers.fill_mask([0])[0], tokenizer.eos_token_id)
    assert matchers.accept([0], [ord("4")]) == []
    mask = matchers.fill_mask([0])[0]
    assert bit(mask, tokenizer.eos_token_id) and bit(mask, ord("7")) and not bit(mask, ord("a"))
    assert matchers.accept([0], [tokenizer.eos_token_id]) == [0]


def bit(row: torch.Tensor, token: int) -> bool:
    return bool((int(row[token // 32]) >> (token % 32)) & 1)


def test_masks_rows_and_padded_vocabulary(tokenizer):
    """Unconstrained rows allow everything; ids past the tokenizer's vocabulary (a padded head) never."""
    vocab = 320
    compiler = GrammarCompiler(tokenizer, vocab, [tokenizer.eos_token_id])
    matchers = compiler.start({0: SamplingParams(), 1: SamplingParams(regex="[a-z ]+"), 2: SamplingParams()})
    mask = matchers.fill_mask([0, 1, 2])
    assert mask.shape == (3, 10) and mask.dtype == torch.int32
    assert (mask[[0, 2]] == -1).all()
    assert not any(bit(mask[1], t) for t in range(len(tokenizer), vocab))
    assert matchers.fill_mask([0, 2]) is None
    assert matchers.fill_mask([1]).data_ptr() != matchers.fill_mask([1]).data_ptr()  # two buffers in turn



def test_mask_counters_count_constrained_rows_only(tokenizer):
    """masks_computed grows by the constrained rows of each fill_mask, tokens_accepted by those of each accept
    (bench.structured reports their ratio: masks computed per generated token); rows in one state share one
    mask unless GrammarCompiler.reuse_by_state is off."""
    params = {rid: SamplingParams(**({"regex": "[a-z]+"} if rid % 2 else {})) for rid in range(6)}
    constrained = sum(1 for p in params.values() if p.constraint is not None)
    for reuse, masks_a_step in ((False, constrained), (True, 1)):  # the same tokens: one state a step
        compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
        compiler.reuse_by_state = reuse
        matchers = compiler.start(params)
        for step in range(3):
            matchers.fill_mask(list(params))
            matchers.accept(list(params), [ord("a")] * len(params))
        assert matchers.tokens_accepted == 3 * constrained
        assert matchers.masks_computed == 3 * masks_a_step

# --------------------------------------------------------------------------- typed columns

def test_column_dtypes_follow_the_schema():
    assert column_dtypes(SamplingParams(json_schema=Review).json_schema) == {
        "rating": "Int64", "price": "Float64", "verified": "boolean", "title": "str", "tone": "str",
        "label": "str", "votes": "Int64", "tags": "object", "inner": "object"}
    assert column_dtypes(json.dumps({"type": "object", "properties": {
        "n": {"type": ["integer", "null"]}, "x": {"anyOf": [{"type": "integer"}, {"type": "number"}]},
        "mixed": {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "c": {"const": True}}})) == {
        "n": "Int64", "x": "Float64", "mixed": "object", "c": "boolean"}


def completion_columns(texts, reasons, errors=None) -> dict[str, pd.Series]:
    index = pd.Index([10, 11, 12, 13, 14][:len(texts)], name="row")
    return {"completion": pd.Series(texts, index=index, dtype="str"),
            "completion_tokens": pd.Series([len(t or "") for t in texts], index=index, dtype="int64"),
            "finish_reason": pd.Series(reasons, index=index, dtype="str"),
            "error": pd.Series(errors or [None] * len(texts), index=index, dtype="str")}


def test_typed_columns_parse_good_rows_and_explain_the_others():
    schema = SamplingParams(json_schema=SCHEMA).json_schema
    texts = ['{"label": "mixed", "score": 7, "ok": true, "name": "abc"}', '{"label": "pos', None,
             '[1, 2]', '{"label": "mixed", "score": 1.5, "ok": true, "name": "x"}']
    reasons = ["stop", "length", "error", "stop", "stop"]
    cols = add_field_columns(completion_columns(texts, reasons, [None, None, "empty prompt", None, None]),
                             schema, "completion")
    frame = pd.DataFrame(cols)
    assert frame.dtypes[["label", "score", "ok", "name"]].astype(str).tolist() == ["str", "Int64", "boolean", "str"]
    assert frame.loc[10, ["label", "score", "ok", "name"]].tolist() == ["mixed", 7, True, "abc"]
    assert pd.isna(frame.loc[10, "error"])
    assert "cut short after 14 tokens by max_tokens" in frame.loc[11, "error"]
    assert frame.loc[12, "error"] == "empty prompt"
    assert "not an object" in frame.loc[13, "error"]
    assert "'score' is 1.5, not a 64-bit integer" in frame.loc[14, "error"]
    assert frame.loc[[11, 12, 13, 14], ["label", "score", "ok", "name"]].isna().all().all()
    assert frame["finish_reason"].tolist() == reasons and frame.index.tolist() == [10, 11, 12, 13, 14]


def test_a_field_named_like_a_result_column_is_refused():
    with pytest.raises(ValueError, match=r"json_schema: field\(s\) \['error', 'text'\]"):
        check_field_names(json.dumps({"properties": {"text": {}, "error": {}, "ok": {}}}),
                          ["text", "completion", "error"])
