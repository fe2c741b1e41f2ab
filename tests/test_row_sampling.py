"""Per-row seeds: a sampled row's completion follows the row, whatever partition or batch it runs in."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import batchllm_dask  # noqa: F401 - registers .llm
from batchllm_dask.engine.config import SamplingParams
from batchllm_dask.row_sampling import per_row_sampling, row_seeds

from _helpers import to_dask


def test_seeds_are_a_function_of_key_and_job_seed():
    idx = pd.Index([10, 11, 12, 13])
    a = row_seeds(idx, 7)
    assert a == row_seeds(pd.Index([10, 11, 12, 13]), 7)          # same keys, same seeds
    assert row_seeds(idx[::-1], 7) == a[::-1]                      # order does not matter
    assert len(set(a)) == 4                                        # distinct keys, distinct seeds
    assert row_seeds(idx, 8) != a and row_seeds(idx, None) == row_seeds(idx, 0)
    assert all(0 <= s < 2**63 for s in a)
    multi = pd.MultiIndex.from_tuples([("a", 1), ("a", 2), ("b", 1)])
    assert len(set(row_seeds(multi, 1))) == 3
    toks = [np.array([1, 2, 3]), np.array([1, 2, 4]), np.array([1, 2, 3])]
    t = row_seeds(toks, 3)
    assert t[0] == t[2] != t[1]


def test_greedy_passes_through_and_sampled_rows_get_their_seed():
    greedy = SamplingParams(temperature=0.0)
    assert per_row_sampling(greedy, pd.RangeIndex(3)) is greedy
    sampled = per_row_sampling(SamplingParams(temperature=0.8, seed=5), pd.Index([4, 9]))
    assert [p.seed for p in sampled] == row_seeds(pd.Index([4, 9]), 5)
    assert all(p.temperature == 0.8 for p in sampled)


@pytest.mark.slow
def test_sampled_completions_do_not_depend_on_partitioning(tiny_llama_dir):
    prompts = [[5 + (i % 7), 9, 11 + i % 3] for i in range(24)]
    df = pd.DataFrame({"prompt": prompts}, index=pd.Index(range(100, 124), name="row"))
    opts = dict(max_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    whole = df.llm.generate("prompt", str(tiny_llama_dir), **opts)
    half = pd.concat([df.iloc[:12].llm.generate("prompt", str(tiny_llama_dir), **opts),
                      df.iloc[12:][::-1].llm.generate("prompt", str(tiny_llama_dir), **opts)])
    assert half.loc[whole.index, "completion"].tolist() == whole["completion"].tolist()
    planned = to_dask(df, 3).llm.generate("prompt", str(tiny_llama_dir), npartitions=4, **opts).compute()
    assert planned.loc[whole.index, "completion"].tolist() == whole["completion"].tolist()
    assert prompts[0] == prompts[21]  # equal prompts, other keys: other samples
    assert whole.loc[100, "completion"] != whole.loc[121, "completion"]


def test_seed_is_a_sampling_option_not_an_engine_option():
    from batchllm_dask.accessor import split_options
    sampling, engine = split_options({"seed": 11, "temperature": 0.5, "dtype": "float32"})
    assert sampling.seed == 11 and engine == {"dtype": "float32"}  # another seed reuses the same engine
