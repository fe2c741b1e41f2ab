"""The `.llm` accessor and `batchllm_dask.generate` on pandas and on Dask's local scheduler, real engine.

The reference is always `Engine.generate` called once on every prompt: greedy
results must match it row for row whatever the partitioning and row order.
"""
from __future__ import annotations

import subprocess
import sys

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest

import batchllm_dask
from batchllm_dask import LLMAccessor
from batchllm_dask.engine import Engine, SamplingParams
from _helpers import spy_engine_prompts, to_dask

ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 32 << 20}
SAMPLING = {"max_tokens": 6, "temperature": 0.0}
RESULT_COLUMNS = ["completion", "prompt_tokens", "completion_tokens", "cached_tokens", "finish_reason", "error"]


def review_prompts(n: int = 18, seed: int = 0) -> list[object]:
    """Three instruction blocks shared by many rows, a few unshared rows, and bad rows in between."""
    rng = np.random.default_rng(seed)
    blocks = [f"Instruction block {b}: label the review as positive or negative and say why. " * 2
              for b in range(3)]
    prompts: list[object] = [blocks[i % 3] + f"Review {i}: " + "good " * int(rng.integers(1, 6)) for i in range(n)]
    prompts += ["a row that shares nothing", "another lonely row"]
    bad = {3: None, 7: "", 11: float("nan"), 14: 5, 16: "y" * 2100}  # 2100: over the tiny model's context
    for i, value in bad.items():
        if i < n:
            prompts[i] = value
    return prompts


def frame(prompts: list[object]) -> pd.DataFrame:
    df = pd.DataFrame({"prompt": pd.Series(prompts, dtype=object), "row": np.arange(len(prompts))})
    df.index = pd.Index([f"id{i}" for i in range(len(prompts))], name="rid")
    return df


@pytest.fixture(scope="module")
def model(tiny_llama_dir) -> str:
    return str(tiny_llama_dir)


@pytest.fixture(scope="module")
def direct(model) -> list:
    """Engine.generate on every prompt at once: the reference."""
    engine = Engine(model, **ENGINE)
    return engine.generate(list(frame(review_prompts())["prompt"]), SamplingParams(**SAMPLING))


def assert_matches_direct(result: pd.DataFrame, df: pd.DataFrame, direct: list) -> None:
    result = result.loc[df.index]
    expected_reason = [o.finish_reason for o in direct]
    assert result["finish_reason"].tolist() == expected_reason
    ok = result["finish_reason"] != "error"
    assert result.loc[ok, "completion"].tolist() == [o.text for o in direct if o.finish_reason != "error"]
    assert result.loc[ok, "completion_tokens"].tolist() == [o.completion_tokens for o in direct
                                                            if o.finish_reason != "error"]
    assert result.loc[ok, "prompt_tokens"].tolist() == [o.prompt_tokens for o in direct if o.finish_reason != "error"]
    assert result.loc[~ok, "error"].str.len().gt(0).all() and result.loc[ok, "error"].isna().all()


def test_pandas_generate_matches_the_engine_row_for_row_in_input_order(model, direct):
    df = frame(review_prompts())
    out = df.llm.generate("prompt", model, **SAMPLING, **ENGINE)
    assert list(out.index) == list(df.index)               # same rows, same order
    assert list(out.columns) == list(df.columns) + RESULT_COLUMNS
    pd.testing.assert_frame_equal(out[df.columns], df)     # input columns untouched
    assert_matches_direct(out, df, direct)


def test_bad_rows_get_an_error_and_every_other_row_completes(model):
    df = frame(review_prompts())
    out = df.llm.generate("prompt", model, **SAMPLING, **ENGINE)
    bad = {"id3": "null", "id7": "empty", "id11": "null", "id14": "int", "id16": "context"}
    for rid, word in bad.items():
        assert out.loc[rid, "finish_reason"] == "error" and word in out.loc[rid, "error"]
        assert pd.isna(out.loc[rid, "completion"]) and out.loc[rid, "completion_tokens"] == 0
    good = out.drop(index=list(bad))
    assert (good["finish_reason"] != "error").all() and (good["completion_tokens"] > 0).all()
    assert len(out) == len(df)


@pytest.mark.parametrize("in_parts,out_parts,seed", [(1, 2, 0), (3, 2, 1), (4, 3, 2), (3, 1, 3)])
def test_dask_matches_the_engine_whatever_the_partitions_and_row_order(model, direct, in_parts, out_parts, seed):
    df = frame(review_prompts())
    shuffled = df.sample(frac=1.0, random_state=seed)
    out = to_dask(shuffled, in_parts).llm.generate("prompt", model, npartitions=out_parts, **SAMPLING, **ENGINE)
    with dask.config.set(scheduler="threads"):
        result = out.compute()
    assert sorted(result.index) == sorted(df.index) and len(result) == len(df)
    assert_matches_direct(result, df, direct)


@pytest.mark.parametrize("out_parts", [2, 1])
def test_dask_meta_is_explicit_and_matches_the_computed_frame(model, out_parts):
    df = frame(review_prompts(8))
    out = to_dask(df, 2).llm.generate("prompt", model, npartitions=out_parts, **SAMPLING, **ENGINE)
    assert list(out.columns) == list(df.columns) + RESULT_COLUMNS
    assert out._meta.index.name == "rid"
    result = out.compute(scheduler="sync")
    pd.testing.assert_series_equal(result.dtypes, out._meta.dtypes)
    assert result.index.name == "rid"


def test_the_pandas_path_gives_the_same_frame_as_the_dask_path(model):
    df = frame(review_prompts(12))
    expected = df.llm.generate("prompt", model, **SAMPLING, **ENGINE)
    result = to_dask(df, 3).llm.generate("prompt", model, npartitions=2, **SAMPLING, **ENGINE).compute()
    # cached_tokens says which row of its batch computed a shared prefix first: it depends on the batches
    pd.testing.assert_frame_equal(result.loc[df.index].drop(columns="cached_tokens"),
                                  expected.drop(columns="cached_tokens"))


def test_series_generate_returns_the_completions_as_a_series(model):
    df = frame(review_prompts(6)).iloc[:2]
    s = df["prompt"].llm.generate(model, **SAMPLING, **ENGINE)
    full = df.llm.generate("prompt", model, **SAMPLING, **ENGINE)
    pd.testing.assert_series_equal(s, full["completion"])
    ds = dd.from_pandas(df["prompt"].astype(str), npartitions=2).llm.generate(model, **SAMPLING, **ENGINE)
    assert isinstance(ds, dd.Series) and ds.name == "completion"
    pd.testing.assert_series_equal(ds.compute().loc[df.index], full["completion"], check_dtype=False)


def test_token_id_rows_and_text_rows_give_the_same_completion(model):
    tokenizer = Engine(model, **ENGINE).tokenizer
    texts = ["The lamp works. Label:", "The tent leaks. Label:"]
    ids = [tokenizer.encode(t) for t in texts]
    by_text = pd.DataFrame({"p": texts}).llm.generate("p", model, **SAMPLING, **ENGINE)
    by_ids = pd.DataFrame({"p": ids}).llm.generate("p", model, **SAMPLING, **ENGINE)
    pd.testing.assert_frame_equal(by_text.drop(columns="p"), by_ids.drop(columns="p"))


def test_chat_messages_and_chat_true_go_through_the_chat_template(model):
    tokenizer = Engine(model, **ENGINE).tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    df = pd.DataFrame({"m": [messages], "t": ["Hi there"]})
    out = df.llm.generate("m", model, **SAMPLING, **ENGINE)
    n = len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert out.loc[0, "prompt_tokens"] == n and out.loc[0, "finish_reason"] != "error"
    chat = df.llm.generate("t", model, chat=True, **SAMPLING, **ENGINE)
    as_messages = pd.DataFrame({"m": [[{"role": "user", "content": "Hi there"}]]}).llm.generate(
        "m", model, **SAMPLING, **ENGINE)
    assert chat.loc[0, "completion"] == as_messages.loc[0, "completion"]
    assert chat.loc[0, "prompt_tokens"] == as_messages.loc[0, "prompt_tokens"] > len("Hi there")


def test_a_missing_column_raises_keyerror_listing_the_columns(model):
    df = frame(review_prompts(4))
    for obj in (df, to_dask(df, 2)):
        with pytest.raises(KeyError, match=r"'nope'.*\['prompt', 'row'\]"):
            obj.llm.generate("nope", model, **SAMPLING)


def test_bad_options_raise_before_anything_is_computed(model):
    def explode(part):
        raise AssertionError("computed")
    ddf = to_dask(frame(review_prompts(4)), 2).map_partitions(explode, meta=frame([]))
    for bad in ({"max_tokens": 0}, {"temperature": -1.0}, {"top_p": 2.0}, {"page_size": 3}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ddf.llm.generate("prompt", model, **bad)
    with pytest.raises(TypeError, match="unknown options"):
        ddf.llm.generate("prompt", model, max_token=4)
    with pytest.raises(ValueError, match="npartitions"):
        ddf.llm.generate("prompt", model, npartitions=0)


def test_the_accessor_is_type_checked_without_attribute_error():
    with pytest.raises(TypeError, match="DataFrame"):
        LLMAccessor(5)
    assert isinstance(pd.DataFrame({"a": [1]}).llm, LLMAccessor)


def test_function_form_dispatches_on_the_input_type(model):
    df = frame(review_prompts(4)).iloc[:2]
    assert isinstance(batchllm_dask.generate(df, "prompt", model, **SAMPLING, **ENGINE), pd.DataFrame)
    assert isinstance(batchllm_dask.generate(to_dask(df, 1), "prompt", model, **SAMPLING), dd.DataFrame)
    with pytest.raises(TypeError, match="pandas or Dask"):
        batchllm_dask.generate([1, 2], "prompt", model)


def test_gpu_resources_does_nothing_without_a_cluster():
    with batchllm_dask.gpu_resources() as annotated:
        assert annotated is False
        assert "resources" not in dask.get_annotations()


def test_importing_the_package_does_not_import_torch():
    code = "import sys, batchllm_dask, pandas as pd; assert hasattr(pd.DataFrame, 'llm'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_each_row_is_tokenized_once_and_the_engine_gets_token_ids(model, monkeypatch):
    from batchllm_dask import planning
    encoded, real_encode = [], planning.encode

    def counting_encode(tokenizer, kinds):
        encoded.extend(k for k, _ in kinds if k == "text")
        return real_encode(tokenizer, kinds)

    monkeypatch.setattr(planning, "encode", counting_encode)
    engine_prompts = spy_engine_prompts(monkeypatch)
    df = frame(review_prompts(12))
    with dask.config.set(scheduler="sync"):
        out = to_dask(df, 3).llm.generate("prompt", model, npartitions=2, **SAMPLING, **ENGINE)
        texts = sum(isinstance(p, str) and p != "" for p in df["prompt"])
        assert len(encoded) == texts and not engine_prompts  # the plan, computed now: tokenized, nothing generated
        encoded.clear()
        out.compute()
    assert len(encoded) == texts                        # the job tokenizes once, though planning reads the ids twice
    assert len(engine_prompts) == texts and all(not isinstance(p, str) and np.asarray(p).dtype.kind in "iu" for p in engine_prompts)
