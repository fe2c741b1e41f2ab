"""The embedded BatchLLM engine: prefix tree, paged KV, scheduler, model, sampler.

Importing this package is cheap; the torch-heavy `Engine` loads on first use.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .config import EngineConfig, SamplingParams
from .outputs import Completion, GenerationStats

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["Engine", "EngineConfig", "SamplingParams", "Completion", "GenerationStats"]


def __getattr__(name: str):
    if name == "Engine":
        from .engine import Engine
        return Engine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
