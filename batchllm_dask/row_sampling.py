"""Per-row seeds of a dataframe job: a sampled row's randomness follows the row, not where it runs.

`Engine.generate` seeds a request that has no seed of its own by its position
in the batch.  Inside a dataframe job that position is the row's place in its
partition, so the same job, partitioned differently (more workers, another
`partition_tokens`, a resumed run), would sample other completions.  Here each
row gets its own seed instead, a pure function of the job's `seed` (0 when
unset) and a stable hash of the row's key:

- on Dask and pandas the key is the row's index value (every level of a MultiIndex);
- on Spark, which has no index, the value of a key column the caller names, else the prompt's token ids.

The hash is pandas' `hash_pandas_object` (SipHash with a fixed key): the same
value on every machine and in every process.  Greedy rows need no seed and pass
through untouched.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import pandas as pd

_MASK63 = (1 << 63) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def key_hashes(keys: pd.Index | pd.Series | Sequence[Any]) -> np.ndarray:
    """uint64 hash of every key (an index value, a column value, or a token-id array)."""
    if isinstance(keys, (pd.Index, pd.Series)):
        return pd.util.hash_pandas_object(keys, index=False).to_numpy(dtype="uint64")
    # token-id arrays (Spark without a key column): hash their bytes
    as_bytes = pd.Series([np.asarray(k, dtype="<i8").tobytes() for k in keys], dtype=object)
    return pd.util.hash_pandas_object(as_bytes, index=False).to_numpy(dtype="uint64")


def row_seeds(keys: pd.Index | pd.Series | Sequence[Any], base_seed: int | None) -> list[int]:
    """One seed in [0, 2**63) per key, mixing the job's seed (None counts as 0) with the key's hash."""
    base = np.uint64(((base_seed or 0) * _GOLDEN) & ((1 << 64) - 1))
    mixed = key_hashes(keys) ^ base
    return [int(s) & _MASK63 for s in mixed]


def per_row_sampling(sampling: Any, keys: pd.Index | pd.Series | Sequence[Any]) -> Any:
    """`sampling` itself when greedy, else one copy of it per row with that row's seed (see the module docstring)."""
    if sampling.temperature == 0:
        return sampling
    return [dataclasses.replace(sampling, seed=s) for s in row_seeds(keys, sampling.seed)]
