"""One host-to-device copy per step, and sampled tokens back without stopping the host.

A step needs a dozen small arrays on the device (token ids, positions, KV
slots, the attention work list and plan, sampling settings).  Copying each
from a pageable numpy array costs a launch and a staging copy; `torch.tensor`
of a list even waits for the device to finish its queue, which would undo the
engine's overlap of host and device.  `Stager` lays all of a step's arrays out
in one pinned host buffer and sends them with one asynchronous copy; the
device tensors handed back are typed views into one device buffer.

Buffers are reused: the pinned one is double-buffered (the copy of step n may
still be reading buffer n % 2 while the host fills the other for step n+1),
the device one is single (the copy of step n+1 is queued on the stream after
step n's kernels, which finish reading it first).

`TokenReturn` copies a step's sampled tokens into pinned memory and records an
event; the host waits for that event only when it needs the ids, a step later.
On the CPU both run the same code without pinning or events.  The CPU's
"device" buffer is reused exactly as the GPU's is, so a caller that keeps one
staging's views past the next `stage` reads the newer bytes on the CPU too,
and the CPU tests catch it (a fallback that staged twice in one step did so).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_ALIGN = 16  # bytes: every view starts aligned for any dtype
_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
                 np.dtype(np.float32): torch.float32, np.dtype(np.uint8): torch.uint8}


class Stager:
    """Sends a dict of 1-d numpy arrays to the device in one copy; returns typed device views."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._host: list[torch.Tensor | None] = [None, None]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._turn = 0
        self._device_buf: torch.Tensor | None = None

    def stage(self, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        offsets, total = _layout(arrays)
        turn, self._turn = self._turn, 1 - self._turn
        host = self._host_buffer(turn, total)
        flat = host.numpy()
        for name, array in arrays.items():
            raw = np.ascontiguousarray(array).view(np.uint8)
            flat[offsets[name]:offsets[name] + raw.size] = raw
        dev = self._device_buffer(total)
        dev[:total].copy_(host[:total], non_blocking=self.cuda)
        if self.cuda:
            self._copied[turn].record()
        return {name: dev[offsets[name]:offsets[name] + arrays[name].nbytes].view(_TORCH_DTYPES[arrays[name].dtype])
                for name in arrays}

    def _host_buffer(self, turn: int, nbytes: int) -> torch.Tensor:
        buf = self._host[turn]
        if self._copied[turn] is not None:
            self._copied[turn].synchronize()  # the copy that last read this buffer (two steps ago) is done
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(_grow(nbytes), dtype=torch.uint8, pin_memory=self.cuda)
            self._host[turn] = buf
            if self.cuda:
                self._copied[turn] = torch.cuda.Event()
        return buf

    def _device_buffer(self, nbytes: int) -> torch.Tensor:
        if self._device_buf is None or self._device_buf.numel() < nbytes:
            self._device_buf = torch.empty(_grow(nbytes), dtype=torch.uint8, device=self.device)
        return self._device_buf


def _layout(arrays: dict[str, np.ndarray]) -> tuple[dict[str, int], int]:
    offsets, at = {}, 0
    for name, array in arrays.items():
        offsets[name] = at
        at += -(-array.nbytes // _ALIGN) * _ALIGN
    return offsets, max(at, _ALIGN)


def _grow(nbytes: int) -> int:
    """Room for nbytes with headroom, rounded to a power of two (few reallocations)."""
    return 1 << max(nbytes - 1, 4096).bit_length()


@dataclass
class SampledTokens:
    """A step's sampled token ids: on the device now (`device`), on the host once `wait` returns."""

    device: torch.Tensor  # [R] int64
    host: torch.Tensor  # [R] int64, pinned on CUDA
    event: torch.cuda.Event | None

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class TokenReturn:
    """Copies each step's tokens into one of two pinned buffers (the host reads step n's while step n+1's lands)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._turn = 0

    def send(self, tokens: torch.Tensor) -> SampledTokens:
        if not self.cuda:
            return SampledTokens(tokens, tokens, None)
        turn, self._turn = self._turn, 1 - self._turn
        buf = self._buffers[turn]
        if buf is None or buf.numel() < tokens.numel():
            buf = self._buffers[turn] = torch.empty(_grow(tokens.numel()), dtype=torch.int64, pin_memory=True)
        host = buf[:tokens.numel()]
        host.copy_(tokens, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return SampledTokens(tokens, host, event)
