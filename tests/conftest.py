"""Shared fixtures: tiny random-weight checkpoints built once per test session (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU through the interpreter; set before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from batchllm_dask.engine.default_model import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama 3 style: GQA (4 query, 2 KV heads), llama3 RoPE scaling, untied head."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), arch="llama")


@pytest.fixture(scope="session")
def tiny_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2 style: q/k/v biases, tied embeddings."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")
