"""Structured output end to end on the tiny random model (which writes random tokens unconstrained):
through `Engine.generate` and through the pandas and Dask accessors."""
from __future__ import annotations

import json
import re
from typing import Literal

import dask
import pandas as pd
import pydantic
import pytest

from batchllm_dask.engine import Engine, SamplingParams
from _helpers import DATE, SCHEMA, assert_valid, to_dask

ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 32 << 20, "min_shared_tokens": 16}
CHOICES = ("positive", "negative", "neutral")
INSTRUCTION = "Read the review and answer in the format asked for. The review follows. " * 2


class Review(pydantic.BaseModel):
    stars: int = pydantic.Field(ge=1, le=5)
    tone: Literal["warm", "cold", "flat"]
    helpful: bool
    price: float = pydantic.Field(ge=0, le=99)


def prompts(n: int = 8) -> list[str]:
    return [INSTRUCTION + f"Review {i}: " + "good " * (i % 4 + 1) for i in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir) -> Engine:
    return Engine(tiny_llama_dir, **ENGINE)


def constrained(kind: str, **sampling) -> SamplingParams:
    value = {"json_schema": SCHEMA, "regex": DATE, "choice": CHOICES}[kind]
    return SamplingParams(max_tokens=120, **{kind: value}, **sampling)


@pytest.mark.parametrize("kind", ["json_schema", "regex", "choice"])
def test_every_engine_output_is_valid_for_greedy_and_seeded_sampled_rows(engine, kind):
    params = [constrained(kind, temperature=0.0)] * 4 + [constrained(kind, temperature=1.0, seed=s) for s in range(4)]
    outs = engine.generate(prompts(), params)
    for out, p in zip(outs, params):
        assert out.finish_reason == "stop", out
        assert_valid(out.text, p)
    if kind != "choice":  # three answers, and the peaked tiny model may like one whatever the seed
        assert len({o.text for o in outs[4:]}) > 1  # sampled rows do differ: the mask does not force one answer


def test_unconstrained_model_breaks_the_format(engine):
    """The premise: without the grammar, the tiny model's output is not of the format."""
    outs = engine.generate(prompts(), SamplingParams(max_tokens=40, temperature=0.0))
    assert not any(re.fullmatch(DATE, o.text) or o.text in CHOICES for o in outs)


def test_a_grammar_that_is_complete_ends_the_request_without_eos(engine):
    outs = engine.generate(prompts(4), constrained("choice", temperature=0.0))
    for out in outs:
        assert out.token_ids == engine.tokenizer.encode(out.text, add_special_tokens=False)
        assert engine.eos_token_ids[0] not in out.token_ids


def test_constraints_leave_other_rows_and_prefix_sharing_alone(engine):
    """Unconstrained rows of a mixed call get the tokens they get alone; shared prefixes are planned and
    prefilled as in an unconstrained call; a seeded sampled row is the same alone or in a batch."""
    plain = [SamplingParams(max_tokens=12, temperature=0.0), SamplingParams(max_tokens=12, temperature=1.0, seed=5)]
    alone = engine.generate(prompts(), plain * 4)
    stats_alone = engine.last_stats
    mixed_params = [plain[0], plain[1], constrained("json_schema", temperature=1.0, seed=3), constrained("regex")] * 2
    mixed = engine.generate(prompts(), mixed_params)
    stats_mixed = engine.last_stats
    for i in (0, 1, 4, 5):
        assert mixed[i].token_ids == alone[i].token_ids
    assert stats_mixed.shared_prefixes == stats_alone.shared_prefixes > 0
    assert stats_mixed.computed_prompt_tokens == stats_alone.computed_prompt_tokens
    single = engine.generate(prompts()[2:3], mixed_params[2])
    assert single[0].token_ids == mixed[2].token_ids


def test_max_tokens_cuts_a_constrained_output_with_reason_length(engine):
    out = engine.generate(prompts(1), SamplingParams(max_tokens=5, json_schema=SCHEMA, temperature=0.0))[0]
    assert out.finish_reason == "length" and out.completion_tokens == 5
    assert out.text == '{"lab'  # the grammar's forced start, one byte token each


# --------------------------------------------------------------------------------- the accessors

def review_frame(n: int = 8) -> pd.DataFrame:
    df = pd.DataFrame({"prompt": prompts(n), "row": range(n)})
    df.index = pd.Index([f"r{i}" for i in range(n)], name="rid")
    return df


OPTIONS = {"max_tokens": 120, "temperature": 1.0, "seed": 11, **ENGINE}
FIELDS = ["stars", "tone", "helpful", "price"]
DTYPES = ["Int64", "str", "boolean", "Float64"]


def test_pandas_json_schema_gives_typed_columns_beside_the_completion(tiny_llama_dir):
    df = review_frame()
    out = df.llm.generate("prompt", str(tiny_llama_dir), json_schema=Review, **OPTIONS)
    assert list(out.columns) == ["prompt", "row", "completion", "prompt_tokens", "completion_tokens", "cached_tokens",
                                 "finish_reason", "error", *FIELDS]
    assert out[FIELDS].dtypes.astype(str).tolist() == DTYPES
    assert out["error"].isna().all() and (out["finish_reason"] == "stop").all()
    for rid, row in out.iterrows():
        parsed = Review.model_validate_json(row["completion"])
        assert [row[f] for f in FIELDS] == [parsed.stars, parsed.tone, parsed.helpful, parsed.price]


def test_dask_json_schema_columns_match_their_meta_and_the_pandas_path(tiny_llama_dir):
    df = review_frame()
    expected = df.llm.generate("prompt", str(tiny_llama_dir), json_schema=Review, **OPTIONS)
    for parts in (2, 1):
        out = to_dask(df, 3).llm.generate("prompt", str(tiny_llama_dir), json_schema=Review, npartitions=parts,
                                          **OPTIONS)
        assert list(out.columns) == list(expected.columns)
        with dask.config.set(scheduler="threads"):
            result = out.compute()
        pd.testing.assert_series_equal(result.dtypes, out._meta.dtypes)
        # cached_tokens says which row of its batch computed a shared prefix first: it depends on the batches
        pd.testing.assert_frame_equal(result.loc[df.index].drop(columns="cached_tokens"),
                                      expected.drop(columns="cached_tokens"))


def test_a_row_cut_by_max_tokens_gets_an_error_and_null_fields(tiny_llama_dir):
    out = review_frame(3).llm.generate("prompt", str(tiny_llama_dir), json_schema=Review,
                                       **{**OPTIONS, "max_tokens": 6})
    assert (out["finish_reason"] == "length").all()
    assert out["error"].str.contains("cut short after 6 tokens by max_tokens").all()
    assert out[FIELDS].isna().all().all() and (out["completion"] == '{"star').all()


def test_choice_and_regex_through_dask(tiny_llama_dir):
    df = review_frame()
    ddf = to_dask(df, 2)
    labels = ddf.llm.generate("prompt", str(tiny_llama_dir), choice=list(CHOICES), npartitions=2, **OPTIONS)
    dates = ddf.llm.generate("prompt", str(tiny_llama_dir), regex=DATE, npartitions=2, **OPTIONS)
    with dask.config.set(scheduler="threads"):
        labels, dates = labels.compute(), dates.compute()
    assert labels["completion"].isin(CHOICES).all() and len(labels) == len(df)
    assert dates["completion"].str.fullmatch(DATE).all() and len(dates) == len(df)


def test_bad_constraints_raise_before_anything_runs(tiny_llama_dir):
    df = review_frame(2)
    with pytest.raises(ValueError, match="^regex: "):
        to_dask(df, 1).llm.generate("prompt", str(tiny_llama_dir), regex="[0-9", **ENGINE)
    with pytest.raises(ValueError, match="json_schema, choice: give at most one"):
        df.llm.generate("prompt", str(tiny_llama_dir), json_schema=Review, choice=["a"], **ENGINE)
    with pytest.raises(ValueError, match=r"json_schema: field\(s\) \['row'\]"):
        df.llm.generate("prompt", str(tiny_llama_dir), json_schema={"properties": {"row": {"type": "integer"}}},
                        **ENGINE)


@pytest.mark.slow
@pytest.mark.parametrize("schema", ["review", "classify"])
def test_the_structured_benchmark_runs_in_its_tiny_cpu_mode(tmp_path, schema):
    """bench/structured.py --tiny: trained vocabulary installed, every constrained output valid against the
    chosen schema, the unconstrained run made of the same token counts (its figures are the GPU's to give)."""
    from batchllm_dask.bench import structured
    structured.main(["--tiny", "--requests", "2", "--max-tokens", "160", "--schema", schema, "--out", str(tmp_path)])
    report = json.loads((tmp_path / f"bench_structured_tiny_{schema}.json").read_text())
    assert report["schema"] == structured.SCHEMAS[schema]
    assert report["vocab_tokens"] == 2048
    (row,) = report["rows"]
    assert row["valid"] == 2 and row["cut_by_max_tokens"] == 0
    # jump-forward appends forced runs without steps of their own; a grammar's end, like EOS, is learned
    # one step late: the last requests may cost one more step
    assert row["tokens_jumped"] > 0
    assert row["constrained_steps"] <= row["unconstrained_steps"] + 1
    assert row["fill_mask_calls"] > 0
    from batchllm_dask.engine.structured import GrammarMatchers
    assert GrammarMatchers.fill_mask.__qualname__ == "GrammarMatchers.fill_mask"  # the timer unwrapped it
