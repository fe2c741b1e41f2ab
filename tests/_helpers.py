"""Small helpers shared by test modules (pytest puts this folder on sys.path)."""
from __future__ import annotations

import dask
import dask.dataframe as dd
import pandas as pd


def trie_count(token_lists: list[list[int]]) -> int:
    """Distinct nodes of the plain (uncompressed) trie of the token lists: each shared prefix once."""
    trie: dict = {}
    count = 0
    for ids in token_lists:
        node = trie
        for t in ids:
            if t not in node:
                node[t] = {}
                count += 1
            node = node[t]
    return count


def to_dask(df: pd.DataFrame, npartitions: int) -> dd.DataFrame:
    """A Dask frame that keeps object columns as they are (Dask would turn non-text rows into strings)."""
    with dask.config.set({"dataframe.convert-string": False}):
        return dd.from_pandas(df, npartitions=npartitions)


def kernel_device() -> str:
    """Where Triton kernels run in this test session: the interpreter on the CPU (conftest sets
    TRITON_INTERPRET=1 when there is no CUDA), else the GPU."""
    import os
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
