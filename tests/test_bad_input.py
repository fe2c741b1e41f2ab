"""Bad input, fuzzed (hypothesis): junk rows through the pandas and the Dask paths, and junk options.

Every row comes back exactly once with its index; a bad row gets finish_reason
"error" and a message naming its problem; a good row completes.  A bad option
is a ValueError or TypeError naming the option, raised before anything runs.
Each example is a real (tiny) engine call, so the example counts are small.
"""
from __future__ import annotations

import math

import dask
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchllm_dask  # noqa: F401 - registers .llm
from _helpers import to_dask
from batchllm_dask.engine.inputs import _token_ids

ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 32 << 20}
SAMPLING = {"max_tokens": 2, "temperature": 0.0, "ignore_eos": True}
VOCAB, CONTEXT = 259, 2048  # the tiny checkpoint's (tests/conftest.py)
OK = "ok"


def case(values: st.SearchStrategy, words: str | tuple[str, ...]) -> st.SearchStrategy:
    """(cell value, what must happen): OK, or the words the row's error must contain."""
    return values.map(lambda v: (v, words))


GOOD = st.one_of(
    case(st.text(min_size=1, max_size=12), OK),                      # any unicode, whitespace included
    case(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10), OK),
    case(st.text(min_size=1, max_size=8).map(lambda t: [{"role": "user", "content": t}]), OK),
)
BAD = st.one_of(
    case(st.sampled_from([None, float("nan"), pd.NA, np.nan]), "null"),
    case(st.sampled_from(["", [], ()]), "empty"),
    case(st.integers(), "int"),
    case(st.floats(allow_nan=False), "float"),
    case(st.booleans(), "bool"),
    case(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), "dict"),
    case(st.binary(max_size=6), "bytes"),
    case(st.lists(st.lists(st.integers(0, 9), max_size=3), min_size=1, max_size=3), "list"),
    case(st.lists(st.integers(-10 ** 6, -1), min_size=1, max_size=3).map(lambda b: [5, *b]), "token ids out of"),
    case(st.lists(st.integers(VOCAB, 2 ** 62), min_size=1, max_size=3).map(lambda b: [*b, 7]), "token ids out of"),
    case(st.lists(st.one_of(st.integers(0, 9), st.text(max_size=2)), min_size=2, max_size=3)
         .filter(lambda v: any(isinstance(x, str) for x in v) and any(isinstance(x, int) for x in v)), "list"),
    case(st.sampled_from(["y" * (CONTEXT + 50), [5] * (CONTEXT + 3)]), "context"),
    case(st.sampled_from(["\ud800", "ok \udfff then"]), "Unicode"),       # lone surrogates: not encodable
    case(st.sampled_from([np.array(5), np.zeros((2, 2), dtype=int)]), "ndarray"),
    case(st.sampled_from([[{"role": "user"}], [{"role": "user", "content": "hi"}, 3]]), "list"),
    case(st.just([{"role": "user", "content": "\ud800"}]), "tokenizer failed on this prompt"),  # only this row
)
ROWS = st.lists(st.one_of(GOOD, BAD), min_size=1, max_size=7)


@pytest.fixture(scope="module")
def model(tiny_llama_dir) -> str:
    return str(tiny_llama_dir)


def frame(cases: list, seed: int) -> pd.DataFrame:
    values = [v for v, _ in cases]
    df = pd.DataFrame({"prompt": pd.Series([None] * len(values), dtype=object), "pos": np.arange(len(values))})
    for i, v in enumerate(values):  # set one by one: pandas would unpack list cells
        df.at[i, "prompt"] = v
    rng = np.random.default_rng(seed)
    return df.set_axis(pd.Index(rng.permutation(len(df)) * 7 + 100, name="rid"))


def check_rows(out: pd.DataFrame, df: pd.DataFrame, cases: list) -> None:
    assert len(out) == len(df) and out.index.is_unique and sorted(out.index) == sorted(df.index)
    out = out.loc[df.index]
    for (value, expected), (_, row) in zip(cases, out.iterrows()):
        if expected == OK:
            assert row["finish_reason"] == "length" and pd.isna(row["error"]), (value, row["error"])
            assert row["completion_tokens"] == SAMPLING["max_tokens"]
        else:
            assert row["finish_reason"] == "error" and expected in row["error"], (value, row["error"])
            assert pd.isna(row["completion"]) and row["completion_tokens"] == 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(cases=ROWS, seed=st.integers(0, 1000), in_parts=st.integers(1, 2), out_parts=st.integers(1, 2))
def test_junk_rows_come_back_once_each_with_an_error_naming_the_problem(model, cases, seed, in_parts, out_parts):
    df = frame(cases, seed)
    pandas_out = df.llm.generate("prompt", model, **SAMPLING, **ENGINE)
    assert list(pandas_out.index) == list(df.index)
    check_rows(pandas_out, df, cases)
    with dask.config.set(scheduler="sync"):
        dask_out = to_dask(df, min(in_parts, len(df))).llm.generate(
            "prompt", model, npartitions=out_parts, partition_tokens=64, **SAMPLING, **ENGINE).compute()
    check_rows(dask_out, df, cases)
    same = ["finish_reason", "error", "completion", "completion_tokens"]
    pd.testing.assert_frame_equal(dask_out.loc[df.index, same], pandas_out[same])


# ----------------------------------------------------------------------------- options

BAD_OPTIONS = st.sampled_from([
    ("max_tokens", 0), ("max_tokens", -1), ("max_tokens", "x"), ("max_tokens", 1.5), ("max_tokens", True),
    ("max_tokens", None), ("temperature", -1), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", "hot"), ("top_p", 2), ("top_p", 0), ("top_p", math.nan), ("top_k", 0), ("top_k", 1.5),
    ("seed", "s"), ("seed", 1.5), ("stop", 5), ("stop", [""]), ("stop", [1]), ("stop", {"a": 1}),
    ("stop_token_ids", 5), ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("ignore_eos", "yes"),
    ("json_schema", 5), ("regex", "("), ("choice", []), ("choice", 5), ("dtype", "int8"), ("page_size", 3),
    ("kv_cache_bytes", -1), ("max_num_seqs", 0), ("npartitions", 0), ("npartitions", "2"),
    ("partition_tokens", 0), ("partition_tokens", "many"), ("output_col", ""), ("output_col", 5),
    ("chat", "yes"), ("checkpoint", 5),
])
UNKNOWN = st.from_regex(r"\A[a-z][a-z_]{2,12}\Z").filter(
    lambda n: n not in batchllm_dask.SamplingParams.field_names() and n not in
    {"dtype", "device", "kv_cache_fraction", "kv_cache_bytes", "page_size", "max_num_batched_tokens", "max_num_seqs",
     "prefix_sharing", "min_shared_tokens", "attention_backend", "progress", "seed", "cuda_graphs", "decode_first",
     "decode_reserve", "tensor_parallel_size", "tokenizer", "npartitions", "partition_tokens", "output_col", "chat",
     "checkpoint"})


def untouchable(tmp_path) -> object:
    """A Dask frame whose computation fails the test: an option check must come before any of it."""
    def explode(part):
        raise AssertionError("computed")
    df = pd.DataFrame({"prompt": ["a", "b"]})
    return to_dask(df, 1).map_partitions(explode, meta=df)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(option=BAD_OPTIONS)
def test_a_bad_option_is_an_error_naming_it_before_anything_runs(model, tmp_path, option):
    name, value = option
    for frame_ in (untouchable(tmp_path), pd.DataFrame({"prompt": ["a"]})):
        with pytest.raises((ValueError, TypeError)) as err:
            frame_.llm.generate("prompt", model, **{name: value})
        assert name in str(err.value), (name, value, str(err.value))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=UNKNOWN, value=st.one_of(st.integers(), st.text(max_size=3)))
def test_an_unknown_option_is_a_type_error_naming_it(model, tmp_path, name, value):
    with pytest.raises(TypeError, match="unknown options") as err:
        untouchable(tmp_path).llm.generate("prompt", model, **{name: value})
    assert repr(name) in str(err.value)


def test_a_row_the_tokenizer_fails_on_fails_alone(model):
    from batchllm_dask.planning import tokenize_rows
    part = pd.DataFrame({"p": pd.Series(["fine text", [{"role": "user", "content": "\ud800"}],
                                         [{"role": "user", "content": "fine too"}], [5, 2 ** 40]], dtype=object)})
    ids, errors = tokenize_rows(part, "p", model, chat=False)
    assert errors[0] is None and errors[2] is None and ids[0] is not None and ids[2] is not None
    assert "tokenizer failed on this prompt" in errors[1] and ids[1] is None
    assert "token ids out of range" in errors[3] and "1099511627776" in errors[3]  # not wrapped into a valid id


def _numpy_token_ids(prompt: list, vocab_size: int):
    """What `_token_ids` did before its fast path: numpy's inference over the whole list."""
    try:
        ids = np.asarray(prompt)
    except (TypeError, ValueError):
        return "refused"
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        return "refused"
    return "out of vocabulary" if ((ids < 0) | (ids >= vocab_size)).any() else ids.astype(np.int64).tolist()


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(-3, 2 ** 65), st.integers(0, VOCAB - 1), st.booleans(),
                          st.floats(allow_nan=False), st.text(max_size=2), st.none()), min_size=1, max_size=6))
def test_a_list_of_ids_is_converted_or_refused_as_numpy_would(prompt):
    """The fast conversion of a list of Python ints (array('q')) gives numpy's ids, and refuses what it refuses:
    floats, strings, None, ids beyond int64, out-of-vocabulary ids, a list of bools only."""
    got = _token_ids(prompt, VOCAB)
    got = got.tolist() if isinstance(got, np.ndarray) else ("out of vocabulary" if "vocabulary" in got else "refused")
    assert got == _numpy_token_ids(prompt, VOCAB)
