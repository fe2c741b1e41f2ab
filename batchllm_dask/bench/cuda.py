"""The two device chores every benchmark here does between timed runs (no-ops without CUDA)."""
from __future__ import annotations

import gc
import types
import weakref
from typing import Any


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


def release_report(dropped: "weakref.ref[Any]") -> str:
    """After `free_memory`, whether a dropped object (an engine) is really gone, and the device memory left.

    Where it is still alive, the types of what refers to it, two levels up: the first thing to look at when
    the next engine cannot get the memory back (seen on an H200, 2026-12-04: the ablations got 20 GiB).
    """
    import torch
    memory = ""
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        memory = (f"; device {free / 2**30:.1f} of {total / 2**30:.1f} GiB free, torch holds "
                  f"{torch.cuda.memory_reserved() / 2**30:.1f} GiB reserved")
    target = dropped()
    if target is None:
        return "released" + memory
    chains = []
    for holder in gc.get_referrers(target):
        if not isinstance(holder, types.FrameType):
            above = [type(h).__name__ for h in gc.get_referrers(holder)][:4]
            chains.append(f"{type(holder).__name__} (held by {', '.join(above) or 'nothing found'})")
    del target
    return "STILL ALIVE, referred to by " + "; ".join(chains[:6]) + memory
