"""The tensors of one forward pass, in one small dataclass (built by the runner, read by the model)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import AttentionWork


@dataclass(frozen=True)
class ForwardBatch:
    """Packed tokens of one step: decodes first, then prefill chunks.

    input_ids, positions, slot_mapping: [T] (int64, int64, int64); slot_mapping
    is the flat KV slot (page * page_size + offset) where each token's K and V
    are written.  logits_rows: [R] rows whose next token is sampled.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    attention: AttentionWork
    logits_rows: torch.Tensor
