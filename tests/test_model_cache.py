"""Which paths are GGUF models, and the build-once cache folder (no model needed)."""
from __future__ import annotations

import pytest

from batchllm_dask.engine.gguf import find_gguf
from batchllm_dask.engine.model_cache import build_once, checkpoint_dir, tokenizer_dir


def test_a_gguf_file_or_a_folder_holding_one_is_a_gguf_model(tmp_path):
    (tmp_path / "m.Q4_1.gguf").write_bytes(b"GGUF")
    assert find_gguf(tmp_path / "m.Q4_1.gguf") == tmp_path / "m.Q4_1.gguf"
    assert find_gguf(tmp_path) == tmp_path / "m.Q4_1.gguf"
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several GGUF files"):
        find_gguf(tmp_path)


def test_an_ordinary_checkpoint_is_used_as_it_is(tiny_llama_dir, tmp_path):
    assert find_gguf(tiny_llama_dir) is None and find_gguf(tmp_path / "missing") is None
    assert checkpoint_dir(tiny_llama_dir, "bfloat16") == str(tiny_llama_dir) == tokenizer_dir(tiny_llama_dir)


def test_build_once_builds_a_folder_once_and_leaves_no_temp_folders(tmp_path):
    calls = []

    def build(folder):
        calls.append(folder)
        (folder / "config.json").write_text("{}")
    final = tmp_path / "cache" / "model"
    assert build_once(final, build) == final and build_once(final, build) == final
    assert len(calls) == 1 and [p.name for p in final.parent.iterdir()] == ["model"]
