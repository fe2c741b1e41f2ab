"""Attention over a paged KV pool, in plain torch: the specification of every kernel.

A forward step's attention is a list of *work items*.  Each item says: the
query rows `[q_start, q_start + q_len)` of the packed queries attend to one KV
*segment*, `kv_len` keys stored in the pages `page_ids[page_start : page_start +
ceil(kv_len / page_size)]` of the pool.  A query row appears in several items
(its shared prefixes, level by level, then its own suffix); each item yields a
partial output normalised over its own keys together with its log-sum-exp, and
the partials of a row merge exactly:

    lse = logaddexp(lse_a, lse_b);  out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

Causal items: query i of the item sees keys j <= kv_len - q_len + i (a prefill
chunk at the end of its own segment).  Non-causal items see every key (a prefix
group's decode queries, or any queries against an ancestor prefix).  A decode
row's own-suffix item has q_len == 1, for which both rules agree.

The engine orders rows so that the requests below each shared prefix are
contiguous: one item then covers a whole prefix group, and a kernel reads that
prefix's KV once for all of them (BatchLLM's prefix-shared attention).

Shapes (T packed query tokens, N items):
    q        [T, num_q_heads, head_dim]
    k_cache  [num_pages, page_size, num_kv_heads, head_dim]   (v_cache the same)
    output   [T, num_q_heads, head_dim], dtype of q
Every row of q must be covered by at least one item.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class AttentionWork:
    """One step's attention work list (int32 tensors on the device of q).

    `max_q_len`, `max_kv_len` and `num_items` are host integers so launchers
    can size grids without a device synchronisation.  `host`: the same work list
    on the CPU when this one was moved from there (`to`), so a launcher that
    plans on the host reads it without copying the device tensors back.
    """

    q_start: torch.Tensor  # [N] first query row of the item
    q_len: torch.Tensor  # [N] query rows in the item
    kv_len: torch.Tensor  # [N] keys in the item's segment
    causal: torch.Tensor  # [N] 1: query i sees keys j <= kv_len - q_len + i; 0: all keys
    page_start: torch.Tensor  # [N] offset of the item's page list in page_ids
    page_ids: torch.Tensor  # [P] pages of all items, concatenated
    num_items: int
    max_q_len: int
    max_kv_len: int
    host: "AttentionWork | None" = field(default=None, compare=False, repr=False)

    def to(self, device: torch.device | str) -> "AttentionWork":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        host = self if self.page_ids.device.type == "cpu" else self.host
        return AttentionWork(move(self.q_start), move(self.q_len), move(self.kv_len), move(self.causal),
                             move(self.page_start), move(self.page_ids), self.num_items, self.max_q_len,
                             self.max_kv_len, host)

    @classmethod
    def from_lists(cls, q_start: list[int], q_len: list[int], kv_len: list[int], causal: list[int],
                   pages: list[list[int]], device: torch.device | str = "cpu") -> "AttentionWork":
        """Build a work list from Python lists; `pages[i]` is item i's page list."""
        page_start, flat = [], []
        for p in pages:
            page_start.append(len(flat))
            flat.extend(p)
        as_t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
        return cls(as_t(q_start), as_t(q_len), as_t(kv_len), as_t(causal), as_t(page_start),
                   as_t(flat if flat else [0]), len(q_start), max(q_len, default=0), max(kv_len, default=0))


def gather_segment(cache: torch.Tensor, page_ids: torch.Tensor, kv_len: int) -> torch.Tensor:
    """The first kv_len tokens stored in `page_ids`: [kv_len, num_kv_heads, head_dim]."""
    page_size = cache.shape[1]
    n_pages = -(-kv_len // page_size)
    return cache[page_ids[:n_pages].long()].flatten(0, 1)[:kv_len]


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [M, Hq, D] over one segment k, v [L, Hkv, D], computed in float32.

    Returns (out [M, Hq, D] float32, lse [M, Hq] float32).  A row with no
    visible key (impossible for valid work) gets lse = -inf and out = 0.
    """
    m, hq, _ = q.shape
    length, hkv, _ = k.shape
    group = hq // hkv
    k = k.float().repeat_interleave(group, dim=1)  # [L, Hq, D]
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("mhd,lhd->hml", q.float(), k) * sm_scale  # [Hq, M, L]
    if causal:
        rows = torch.arange(m, device=q.device)[:, None]
        cols = torch.arange(length, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + (length - m), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, M]
    probs = torch.exp(scores - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hml,lhd->mhd", probs, v)
    return out, lse.transpose(0, 1).contiguous()


def merge_partial(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two normalised partial attentions of the same rows by their log-sum-exp."""
    new_lse = torch.logaddexp(acc_lse, lse)
    w_acc = torch.exp(acc_lse - new_lse).nan_to_num(0.0)[..., None]
    w_new = torch.exp(lse - new_lse).nan_to_num(0.0)[..., None]
    return acc_out * w_acc + out * w_new, new_lse


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              work: AttentionWork, sm_scale: float) -> torch.Tensor:
    """The specification: every item's partial attention, merged per row by log-sum-exp."""
    t, hq, d = q.shape
    acc_out = torch.zeros(t, hq, d, dtype=torch.float32, device=q.device)
    acc_lse = torch.full((t, hq), float("-inf"), dtype=torch.float32, device=q.device)
    src = work.host if work.host is not None else work  # a host copy, where there is one: no device sync
    items = zip(src.q_start.tolist(), src.q_len.tolist(), src.kv_len.tolist(), src.causal.tolist(),
                src.page_start.tolist())
    for q_start, q_len, kv_len, causal, page_start in items:
        if q_len == 0 or kv_len == 0:
            continue
        pages = work.page_ids[page_start:]
        k = gather_segment(k_cache, pages, kv_len)
        v = gather_segment(v_cache, pages, kv_len)
        rows = slice(q_start, q_start + q_len)
        out, lse = segment_attention(q[rows], k, v, bool(causal), sm_scale)
        acc_out[rows], acc_lse[rows] = merge_partial(acc_out[rows], acc_lse[rows], out, lse)
    return acc_out.to(q.dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys and values k, v [T, Hkv, D] at flat slots page * page_size + offset."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping.long(), k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping.long(), v.to(v_cache.dtype))


# ---- the fused elementwise ops of a decoder layer (fused_ops.py), in eager torch ----

def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * RMSNorm(x + residual), x + residual), x [T, H]: float32 statistics, HF's order of casts."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype), x


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (HF layout).  x: [T, H, D]; cos, sin: [T, D/2] already in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rope_and_store_kv_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                slot_mapping: torch.Tensor) -> torch.Tensor:
    """RoPE on q [T, Hq, D] and k [T, Hkv, D] (cos, sin [T, D/2] cast to q's dtype); k, v written; rotated q."""
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    write_kv(k_cache, v_cache, apply_rope(k, cos, sin), v, slot_mapping)
    return apply_rope(q, cos, sin)


def silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] laid out [gate | up] -> silu(gate) * up [T, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
