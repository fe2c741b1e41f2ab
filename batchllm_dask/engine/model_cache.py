"""The cache folder, and the model path a user gives resolved to a checkpoint folder the loader reads.

    checkpoint_dir("/models/SmolLM2-135M-Instruct.Q4_1.gguf", "bfloat16")
    # ~/.cache/batchllm_dask/gguf/SmolLM2-135M-Instruct.Q4_1-<key>/bfloat16

An ordinary checkpoint folder is returned as it is.  A GGUF file (or a folder
holding one) is converted once (gguf.py) into `<cache>/gguf/<name>-<key>/`:
`tokenizer/` (config and tokenizer only, what tokenizing and planning need)
and one folder per dtype with the weights.  The key hashes the file's absolute
path, size and modification time, so a changed file is converted again.
Parallel processes (Dask workers) convert into private temp folders and rename
atomically; the first rename wins, the others use it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from . import gguf


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else `$XDG_CACHE_HOME/batchllm_dask` (else `~/.cache/batchllm_dask`)."""
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batchllm_dask"


def build_once(final: Path, build: Callable[[Path], object], marker: str = "config.json") -> Path:
    """`final`, built by `build(tmp)` into a temp folder beside it and renamed, unless it exists already."""
    if (final / marker).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        os.rename(tmp, final)  # atomic; fails if another process got there first
    except OSError:
        if not (final / marker).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _gguf_folder(file: Path, cache_dir: str | Path | None) -> Path:
    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root(cache_dir) / "gguf" / f"{file.stem}-{key}"


def checkpoint_dir(model: str | os.PathLike, dtype: str = "float32", cache_dir: str | Path | None = None) -> str:
    """The checkpoint folder to load `model` from: itself, or its GGUF file converted to `dtype` (cached)."""
    file = gguf.find_gguf(model)
    if file is None:
        return os.fspath(model)
    final = _gguf_folder(file, cache_dir) / dtype
    return str(build_once(final, lambda tmp: gguf.convert_checkpoint(file, tmp, dtype), "model.safetensors"))


def tokenizer_dir(model: str | os.PathLike, cache_dir: str | Path | None = None) -> str:
    """A folder with `model`'s config and tokenizer: itself, or its GGUF file's (converted once, no weights)."""
    file = gguf.find_gguf(model)
    if file is None:
        return os.fspath(model)
    final = _gguf_folder(file, cache_dir) / "tokenizer"
    return str(build_once(final, lambda tmp: gguf.convert_tokenizer(file, tmp)))
