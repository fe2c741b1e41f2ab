"""Extend (prefill) attention over the paged pool (Triton): packed variable-length chunks.

A prefill chunk of request r is `q_len` new tokens, packed with the other
chunks of the step into q [T, Hq, D]; their K and V are already written to
the pool (`write_kv`).  The chunk attends

* causally to its own segment: the request's earlier chunks and itself,
  `kv_len` keys of which the last `q_len` are the chunk (row i sees keys
  j <= kv_len - q_len + i): one causal item;
* to every shared prefix above the request in full: one non-causal item per
  level, the prefix's pages read once for every row of the chunk.

The kernel is the one of `prefix_attention` with its CAUSAL flag on (one
kernel, one place): a causal item's rows are packed with the query heads of
their KV head into big tiles, its keys split across programs, and its key
range clipped past the chunk's last visible key, so the upper triangle costs
nothing beyond its diagonal blocks.  Rows covered by one tile only (a chunk
without shared prefix, short enough not to be split) are written directly;
the others merge by log-sum-exp in the small second launch.  Decode items may
share the launch (the engine's mixed steps); limits as in prefix_attention.
"""
from __future__ import annotations

import torch

from .prefix_attention import run_paged_attention
from .reference import AttentionWork


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, work: AttentionWork,
                     sm_scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal chunk attention with cached context, as `paged_attention_reference` computes it.

    q [T, Hq, D] packed chunks; k_cache, v_cache [num_pages, page_size, Hkv, D];
    work: causal items (each chunk over its own segment) and non-causal items
    (shared prefixes), int32 tensors on q's device.  Returns out [T, Hq, D].
    """
    assert work.q_len.shape == work.causal.shape == work.kv_len.shape, "ragged work list"
    return run_paged_attention(q, k_cache, v_cache, work, sm_scale, out)
