"""Resume of a Dask job: finished rows on disk, the manifest, and what a re-run skips.

    out = ddf.llm.generate("prompt", model, max_tokens=64, checkpoint="/shared/jobs/reviews/")
    out.to_parquet("answers.parquet")      # interrupted?  run the same two lines again

The folder, on a filesystem every worker and the client see at the same path:

    _manifest.json                 what produced the rows: the model's fingerprint, the sampling options, the
                                   engine options that change outputs, the prompt and output columns
    part-<digest>.parquet          one finished output partition: its rows' result columns, indexed by the rows'
                                   index (`pd.read_parquet(folder)` reads them all)
    .part-<digest>.<uuid>.tmp      a part being written; renamed into place when complete, never read

A row is identified by its index value, so the index must be unique (checked
when the job is built; a duplicated index is a ValueError).  Each output
partition, when the engine has finished it, writes its rows to a temporary
file which is then renamed (`os.replace`, atomic on POSIX filesystems): a part
is either absent or complete.  The part's name is a hash of its rows' keys, so
a partition that runs twice (its worker lost after writing, say) replaces its
own file instead of adding a second copy.

Built again over the same input, the job reads the keys of the finished parts
(on the client: one index value per finished row), drops those rows from what
it plans and generates, and gets their results back from the parts by a join
on the index with the input rows.  Every input row comes out once: generated
now, or read back.  Rows of the checkpoint that are not in the input are left
out; a row of the input whose index is in the checkpoint is not run again, even
if its prompt changed (use a new folder for a new input).

Only the result columns are stored (completion, token counts, finish reason,
error; a JSON schema's field columns are parsed again from the completion when
read back): input columns of any type come from the input, not from a parquet
round trip.  Concurrent jobs on one folder are not supported.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

MANIFEST = "_manifest.json"  # "_" and "." files are not part of the dataset for pyarrow (pd.read_parquet)
VERSION = 1
# The engine options that change what is computed, not how or where: the weights' precision and the tokenizer.
# The others (device, kv_cache_bytes, page_size, max_num_batched_tokens, cuda_graphs, attention_backend,
# prefix_sharing, tensor_parallel_size, ...) only change the schedule and the kernels, which moves greedy
# outputs by floating-point near-ties at most, as another partitioning does; `seed` is unused here because
# every sampled row gets its own seed from its index (row_sampling.py).
OUTPUT_ENGINE_OPTIONS = ("dtype", "tokenizer")
HEAD_BYTES = 1 << 20  # a weight file is fingerprinted by its size and the hash of its first MiB (its header)
_WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja",
                    "chat_template.json", "model.safetensors.index.json")


# ----------------------------------------------------------------------------- the manifest

def file_fingerprint(path: Path) -> dict[str, Any]:
    """A file's size and the sha256 of its first `HEAD_BYTES`: cheap, and enough to tell weights apart."""
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    return {"size": path.stat().st_size, "head_sha256": hashlib.sha256(head).hexdigest()}


def model_fingerprint(model: str) -> dict[str, Any]:
    """The model's config.json content and every weight and tokenizer file's fingerprint.

    A model the client cannot see (only the workers can) is recorded by its path alone.
    """
    path = Path(model)
    if not path.exists():
        return {"path": model, "visible": False}
    if path.is_file():  # a GGUF file
        return {"path": model, "files": {path.name: file_fingerprint(path)}}
    config = path / "config.json"
    files = sorted(p for p in path.iterdir() if p.is_file() and
                   (p.name.endswith(_WEIGHT_SUFFIXES) or p.name in _TOKENIZER_FILES))
    return {"path": model, "config": json.loads(config.read_text()) if config.is_file() else None,
            "files": {p.name: file_fingerprint(p) for p in files}}


def job_manifest(model: str, sampling: Any, engine_options: dict[str, Any], prompt_col: str, output_col: str,
                 chat: bool) -> dict[str, Any]:
    """What makes a job's outputs what they are (JSON-ready); see the module docstring."""
    engine = {k: engine_options[k] for k in OUTPUT_ENGINE_OPTIONS if k in engine_options and k != "tokenizer"}
    manifest = {"version": VERSION, "model": model_fingerprint(model),
                "sampling": dataclasses.asdict(sampling), "engine": engine,
                "columns": {"prompt_col": prompt_col, "output_col": output_col, "chat": chat}}
    if engine_options.get("tokenizer") is not None:  # by its files' fingerprints, like the model: not its path
        manifest["tokenizer"] = model_fingerprint(str(engine_options["tokenizer"]))
    return json.loads(json.dumps(manifest, default=str))  # tuples -> lists, as they read back


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """"name: old then, new now" for every value that differs between two manifests (paths not compared)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            if key == "path":  # a model moved elsewhere is the same model
                continue
            name = f"{where}[{key}]" if "." in str(key) else f"{where}.{key}" if where else str(key)
            out += differences(old.get(key, "<absent>"), new.get(key, "<absent>"), name)
        return out
    return [] if old == new else [f"{where}: {old!r} in the checkpoint, {new!r} now"]


def _short_name(where: str) -> str:
    """sampling.temperature -> temperature, model.config.hidden_size -> model: the message's summary."""
    name = where.split(":")[0]
    if name.startswith(("model.", "model[", "tokenizer.", "tokenizer[")):
        return name.split(".")[0].split("[")[0]
    return name.removeprefix("sampling.").removeprefix("engine.").removeprefix("columns.")


# ----------------------------------------------------------------------------- the folder

@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder, and the finished parts it held when the job was built."""

    folder: str
    parts: tuple[str, ...]

    @classmethod
    def open(cls, folder: str | os.PathLike, manifest: dict[str, Any]) -> "Checkpoint":
        """Create the folder and its manifest, or check an existing manifest against `manifest`.

        ValueError naming every setting that differs (old and new values), or when the folder holds
        something other than a checkpoint.
        """
        path = Path(folder).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise ValueError(f"checkpoint: {path} is a file; give a folder")
        path.mkdir(parents=True, exist_ok=True)
        written = path / MANIFEST
        if written.is_file():
            _check_manifest(path, json.loads(written.read_text()), manifest)
        elif any(p for p in path.iterdir() if not p.name.startswith(".")):
            raise ValueError(f"checkpoint: {path} is not empty and has no {MANIFEST}: not a checkpoint folder "
                             "(give an empty or new folder)")
        else:
            _write_atomically(written, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return cls(str(path), tuple(str(p) for p in sorted(path.glob("part-*.parquet"))))

    def finished_keys(self) -> pd.Index:
        """The index values of every finished row (read from the parts' index columns only)."""
        keys = [_part_keys(p) for p in self.parts]
        if not keys:
            return pd.Index([])
        out = keys[0].append(keys[1:]) if len(keys) > 1 else keys[0]
        if not out.is_unique:
            raise ValueError(f"checkpoint: {self.folder} holds some rows twice (in different part files): "
                             "was it written by two jobs at once?  Remove the duplicated parts or use a new folder")
        return out


def _check_manifest(path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    diffs = sorted(differences(old, new), key=lambda d: d.startswith(("model", "tokenizer")))  # options first
    if diffs:
        names = sorted({_short_name(d) for d in diffs})
        more = f"; and {len(diffs) - 8} more" if len(diffs) > 8 else ""
        raise ValueError(f"checkpoint: {path} was written by a job with other settings ({', '.join(names)}); "
                         "resume with the same ones or use a new folder: " + "; ".join(diffs[:8]) + more)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _part_keys(part: str) -> pd.Index:
    try:
        return pd.read_parquet(part, columns=[]).index
    except Exception as exc:  # noqa: BLE001 - named with its file
        raise ValueError(f"checkpoint: cannot read the finished part {part}: {exc}") from exc


def part_name(index: pd.Index) -> str:
    """The file name of the part holding the rows of `index`: a hash of its keys, whatever their order."""
    from .row_sampling import key_hashes
    digest = hashlib.blake2b(np.sort(key_hashes(index)).tobytes(), digest_size=16).hexdigest()
    return f"part-{digest}.parquet"


def record_partition(part: pd.DataFrame, folder: str, columns: list[str]) -> pd.DataFrame:
    """A task: write a finished partition's result `columns` (and index) to the folder, then pass it on."""
    if len(part):
        path = Path(folder) / part_name(part.index)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            part[columns].to_parquet(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return part


def read_part(path: str, meta: pd.DataFrame) -> pd.DataFrame:
    """One finished part, with the dtypes of `meta` (its index's too)."""
    out = pd.read_parquet(path)
    out.index = out.index.astype(meta.index.dtype)
    return out.astype(meta.dtypes.to_dict())


# ----------------------------------------------------------------------------- the job

def _finished_mask(part: pd.DataFrame, keys: pd.Index) -> pd.Series:
    return pd.Series(part.index.isin(keys), index=part.index)


def _select(part: pd.DataFrame, keys: pd.Index, finished: bool) -> pd.DataFrame:
    mask = part.index.isin(keys)
    return part[mask if finished else ~mask]


def check_index(ddf: Any, keys: pd.Index) -> tuple[int, int]:
    """(rows, rows already finished) of `ddf`, computed now; ValueError when its index is not unique."""
    import dask
    finished = ddf.map_partitions(_finished_mask, dask.delayed(keys), meta=(None, bool))
    rows, distinct, done = dask.compute(ddf.index.size, ddf.index.nunique(), finished.sum())
    if distinct != rows:
        raise ValueError(f"checkpoint: rows are identified by their index, which must be unique; this frame's "
                         f"index has {rows} rows but {distinct} distinct values.  Set a unique id as the index "
                         "(ddf.set_index('id')) before generate")
    return int(rows), int(done)


def _finish_rows(rows: pd.DataFrame, sampling: Any, output_col: str, meta: pd.DataFrame) -> pd.DataFrame:
    """Input rows joined with their stored results: the schema's fields parsed again, counted as done rows."""
    from . import progress
    from .worker import with_schema_fields
    columns = with_schema_fields({c: rows[c] for c in _result_columns(output_col)}, sampling, output_col)
    progress.count(len(rows), 0)  # finished rows count toward a progress bar's total
    return rows.assign(**columns)[list(meta.columns)].astype(meta.dtypes.to_dict())


def _result_columns(output_col: str) -> list[str]:
    from .worker import result_columns
    return list(result_columns(pd.RangeIndex(0), [], [], output_col))


def resume(ddf: Any, checkpoint: Checkpoint, run: Callable[[Any], Any], meta: pd.DataFrame, sampling: Any,
           output_col: str) -> Any:
    """Every row of `ddf`: the finished ones read back from `checkpoint`, the others through `run`, recorded.

    run: the lazy generate job of a Dask frame (its plan computed now); it is
    called only on the rows not finished yet, and not at all when every row is.
    """
    import dask
    import dask.dataframe as dd
    from .planning import shuffle_method
    keys = checkpoint.finished_keys()
    rows, done = check_index(ddf, keys)
    columns = _result_columns(output_col)
    pieces = []
    if done == rows:  # nothing to plan: no placement of an earlier job should apply to this one
        from .assignment import clear_placement
        clear_placement()
    if done < rows:
        todo = ddf if not len(keys) else ddf.map_partitions(_select, dask.delayed(keys), False, meta=ddf._meta)
        pieces.append(run(todo).map_partitions(record_partition, checkpoint.folder, columns, meta=meta))
    if done:
        stored_meta = meta[columns]
        stored = dd.from_map(read_part, list(checkpoint.parts), meta=stored_meta, args=(stored_meta,))
        finished = ddf.map_partitions(_select, dask.delayed(keys), True, meta=ddf._meta)
        joined = dd.merge(finished, stored, left_index=True, right_index=True, how="left",
                          shuffle_method=shuffle_method(ddf._meta))
        pieces.append(joined.map_partitions(_finish_rows, sampling, output_col, meta, meta=meta))
    return pieces[0] if len(pieces) == 1 else dd.concat(pieces)
