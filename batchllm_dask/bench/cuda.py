"""The two device chores every benchmark here does between timed runs (no-ops without CUDA)."""
from __future__ import annotations

import gc


def synchronize() -> None:
    """Wait for the GPU's queued work, so that a wall-clock interval covers it."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    """Collect the dropped engine and hand its cached blocks back, before the next engine allocates its pool."""
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
