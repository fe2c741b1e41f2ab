"""Read and write a table by its file extension: parquet, CSV or JSON Lines, local or any fsspec URL.

    ddf = read_table("s3://bucket/rows.jsonl")      # dd.read_json(lines=True)
    write_table(out, "answers.csv")                 # one CSV file

A compression suffix (.gz, .bz2, .xz, .zst) after the format's is allowed for
CSV and JSON Lines.  A path without an extension is a parquet dataset (a
folder).  Parquet is written as Dask writes it (a folder of part files); CSV
and JSON Lines as one file, since that is what a user who names `answers.csv`
expects.
"""
from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".json": "jsonl"}
_COMPRESSION = {".gz", ".bz2", ".xz", ".zst"}


def table_format(path: str, flag: str = "path") -> str:
    """"parquet", "csv" or "jsonl" from `path`'s extension; ValueError naming `flag` and the path otherwise."""
    suffixes = [s.lower() for s in PurePosixPath(path.rstrip("/")).suffixes]
    if suffixes and suffixes[-1] in _COMPRESSION:
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in FORMATS:
        return FORMATS[suffixes[-1]]
    if not suffixes:  # a parquet dataset is a folder of part files
        return "parquet"
    raise ValueError(f"{flag}: cannot tell the format of {path!r}; name a file ending in "
                     f"{', '.join(sorted(FORMATS))} (a compression suffix may follow CSV or JSON Lines)")


def read_table(path: str, flag: str = "INPUT", storage_options: dict | None = None) -> Any:
    """A Dask DataFrame of the table at `path`."""
    import dask.dataframe as dd
    kind = table_format(path, flag)
    opts = {"storage_options": storage_options} if storage_options else {}
    try:
        if kind == "parquet":
            return dd.read_parquet(path, **opts)
        if kind == "csv":
            return dd.read_csv(path, compression="infer", blocksize=None if _compressed(path) else "64MB", **opts)
        return dd.read_json(path, lines=True, orient="records", compression="infer",
                            blocksize=None if _compressed(path) else 2 ** 26, **opts)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{flag}: {path!r} not found") from exc


def _compressed(path: str) -> bool:
    return PurePosixPath(path).suffix.lower() in _COMPRESSION


def write_table(ddf: Any, path: str, flag: str = "OUTPUT", storage_options: dict | None = None) -> None:
    """Compute `ddf` into `path` in the format its extension names."""
    kind = table_format(path, flag)
    opts = {"storage_options": storage_options} if storage_options else {}
    if kind == "parquet":
        ddf.to_parquet(path, **opts)
    elif kind == "csv":
        ddf.to_csv(path, single_file=True, index=False, compression="infer", **opts)
    else:
        _write_jsonl(ddf, path, storage_options)


def _write_jsonl(ddf: Any, path: str, storage_options: dict | None) -> None:
    """One JSON Lines file: partitions are appended as they finish (Dask's to_json writes one file each).

    All partitions are submitted in one graph (they share the tokenizing and planning tasks).
    """
    import fsspec
    with fsspec.open(path, "wt", compression="infer", **(storage_options or {})) as f:
        for frame in _finished_partitions(ddf):
            if len(frame):
                text = frame.to_json(orient="records", lines=True, date_format="iso", force_ascii=False)
                f.write(text if text.endswith("\n") else text + "\n")


def _finished_partitions(ddf: Any) -> Any:
    """Every computed partition of `ddf`, in the order they finish on a distributed client, else all at once."""
    import dask
    parts = ddf.to_delayed()
    try:
        from distributed import as_completed, default_client
        client = default_client()
    except (ImportError, ValueError):
        yield from dask.compute(*parts)
        return
    for future in as_completed(client.compute(parts)):
        yield future.result()
