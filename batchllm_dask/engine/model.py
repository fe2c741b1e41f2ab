"""A Llama-family decoder in plain torch: Llama 2/3.x, Qwen2/2.5, Mistral.

One readable file in the gpt-fast manner.  Parameter names are the Hugging Face
checkpoint names (`model.layers.0.self_attn.q_proj.weight`, ...), so loading is
a plain state-dict mapping.  The numerics follow transformers step by step
(RMSNorm in float32 then cast back, RoPE tables in float32 cast to the
activation dtype, SiLU-gated MLP) so that greedy tokens match HF's `generate`.

The model sees packed tokens, not [batch, seq] tensors: one `ForwardBatch` of
T tokens from many requests, with attention done over the paged KV pool by
`kernels.paged_attention` (the one attention seam).

A decode step on a fast GPU is bound by launch overhead, so on CUDA in fp16/bf16
a layer is about ten launches: fused q/k/v and gate/up matmuls (the loader calls
`fuse_projections`), and the Triton ops of `kernels.fused_ops` (add + RMSNorm,
RoPE + KV store, SiLU * up).  The residual stream travels beside the hidden
state and is added inside the next norm (vLLM's `RMSNorm(x, residual)`).  fp32
and the CPU run the same steps as eager torch ops (`kernels.reference`).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..kernels import paged_attention
from ..kernels.reference import rms_norm_reference, rope_and_store_kv_reference, silu_and_mul_reference
from .batch import ForwardBatch
from .model_args import (SUPPORTED_ARCHITECTURES, SUPPORTED_MODEL_TYPES,  # noqa: F401 - re-exported
                         SUPPORTED_ROPE_TYPES, ModelArgs)


def rope_inv_freq(args: ModelArgs) -> Tensor:
    """Inverse frequencies [head_dim // 2] float32, computed exactly as transformers does."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if args.rope_type == "llama3":
        inv_freq = _llama3_scale(inv_freq, args)
    return inv_freq


def _llama3_scale(inv_freq: Tensor, args: ModelArgs) -> Tensor:
    """Llama 3.1 scaling: long wavelengths divided by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = args.rope_factor, args.rope_low_freq_factor, args.rope_high_freq_factor
    old_context_len = args.rope_original_max_position
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_tables(args: ModelArgs) -> tuple[Tensor, Tensor]:
    """cos, sin: [max_position_embeddings, head_dim // 2] float32 on the CPU (moved with the model)."""
    positions = torch.arange(args.max_position_embeddings, device="cpu").float()
    freqs = positions[:, None] * rope_inv_freq(args)[None, :]  # same fp32 product as HF's matmul
    return freqs.cos(), freqs.sin()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None, fused: bool = False) -> tuple[Tensor, Tensor]:
        """(RMSNorm(x + residual), x + residual); float32 statistics, cast back before the weight (HF's order)."""
        if fused:
            from ..kernels.fused_ops import rms_norm  # triton loads only where it runs
            return rms_norm(x, self.weight, self.eps, residual)
        return rms_norm_reference(x, self.weight, self.eps, residual)


def _concat_linears(*parts: nn.Linear) -> nn.Linear:
    """One Linear whose output is the parts' outputs side by side (their weights and biases concatenated)."""
    first = parts[0]
    fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                      device="meta")  # no init: the parameters are replaced below
    with torch.no_grad():
        fused.weight = nn.Parameter(torch.cat([p.weight for p in parts]), first.weight.requires_grad)
        if first.bias is not None:
            fused.bias = nn.Parameter(torch.cat([p.bias for p in parts]), first.bias.requires_grad)
    return fused


class Attention(nn.Module):
    """HF's q/k/v_proj until `fuse_projections` turns them into one qkv_proj (rows [q | k | v])."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.sm_scale = args.head_dim ** -0.5
        q_dim, kv_dim = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.split_sizes = [q_dim, kv_dim, kv_dim]
        self.q_proj = nn.Linear(args.hidden_size, q_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, kv_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, kv_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_dim, args.hidden_size, bias=args.o_bias)
        self.is_fused = False

    def fuse_projections(self) -> None:
        if not self.is_fused:
            self.qkv_proj = _concat_linears(self.q_proj, self.k_proj, self.v_proj)
            del self.q_proj, self.k_proj, self.v_proj  # the only references: their memory goes
            self.is_fused = True

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [T, Hq, D], k and v [T, Hkv, D]; views into one buffer when fused."""
        t = x.shape[0]
        if self.is_fused:
            q, k, v = self.qkv_proj(x).split(self.split_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return (q.view(t, self.num_heads, self.head_dim), k.view(t, self.num_kv_heads, self.head_dim),
                v.view(t, self.num_kv_heads, self.head_dim))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, batch: ForwardBatch, k_cache: Tensor,
                v_cache: Tensor, backend: str, fused: bool) -> Tensor:
        q, k, v = self.project(x)
        if fused:
            from ..kernels.fused_ops import rope_and_store_kv
            q = rope_and_store_kv(q, k, v, cos, sin, k_cache, v_cache, batch.slot_mapping, out=q)  # q in place
        else:
            q = rope_and_store_kv_reference(q, k, v, cos, sin, k_cache, v_cache, batch.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, batch.attention, self.sm_scale, backend)  # o: [T, Hq, D]
        return self.o_proj(o.reshape(x.shape[0], -1))


class MLP(nn.Module):
    """HF's gate/up_proj until `fuse_projections` turns them into one gate_up_proj (rows [gate | up])."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)
        self.is_fused = False

    def fuse_projections(self) -> None:
        if not self.is_fused:
            self.gate_up_proj = _concat_linears(self.gate_proj, self.up_proj)
            del self.gate_proj, self.up_proj
            self.is_fused = True

    def forward(self, x: Tensor, fused: bool) -> Tensor:
        if self.is_fused:
            gate_up = self.gate_up_proj(x)  # [T, 2I]
        else:
            gate_up = torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)
        if fused:
            from ..kernels.fused_ops import silu_and_mul
            return self.down_proj(silu_and_mul(gate_up))
        return self.down_proj(silu_and_mul_reference(gate_up))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h: Tensor, residual: Tensor | None, cos: Tensor, sin: Tensor, batch: ForwardBatch,
                k_cache: Tensor, v_cache: Tensor, backend: str, fused: bool) -> tuple[Tensor, Tensor]:
        """h: the previous layer's MLP output (layer 0: the embeddings, residual None) -> (this layer's, residual).

        The residual stream is h + residual, summed inside the next norm: HF's `h = h + f(norm(h))`, reordered.
        """
        x, residual = self.input_layernorm(h, residual, fused)
        h = self.self_attn(x, cos, sin, batch, k_cache, v_cache, backend, fused)
        x, residual = self.post_attention_layernorm(h, residual, fused)
        return self.mlp(x, fused), residual


class DecoderModel(nn.Module):
    """The `model.` prefix of HF checkpoints: embeddings, layers, final norm."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """Decoder + LM head over packed tokens and a paged KV pool.

    k_cache, v_cache: [num_layers, num_pages, page_size, num_kv_heads, head_dim].
    fused: None picks the Triton ops of `kernels.fused_ops` for CUDA fp16/bf16
    activations and eager torch otherwise; True or False forces them (tests; on
    the CPU True needs TRITON_INTERPRET=1).
    """

    def __init__(self, args: ModelArgs, fused: bool | None = None):
        super().__init__()
        self.args = args
        self.fused = fused
        self.model = DecoderModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.tie_weights()
        # Explicit CPU device: the tables stay real even when the model is built on the meta device.
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)  # [max_pos, D/2]
        self.register_buffer("rope_sin", sin, persistent=False)

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """One qkv_proj and one gate_up_proj matmul per layer; call after loading HF-named weights.

        The separate weights are dropped as each layer is fused, so the peak is one layer's projections
        more than the model (provided the caller holds no other reference to the loaded tensors).
        """
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def use_fused(self, h: Tensor) -> bool:
        """Whether this forward runs the Triton ops (see `fused`)."""
        if self.fused is not None:
            return self.fused
        return h.is_cuda and h.dtype in (torch.float16, torch.bfloat16)

    def forward(self, batch: ForwardBatch, k_cache: Tensor, v_cache: Tensor,
                attention_backend: str = "auto") -> Tensor:
        """Run the T packed tokens; write their K/V; return final-normed hidden [R, hidden] of logits_rows."""
        h = self.model.embed_tokens(batch.input_ids)  # h: [T, hidden]
        fused = self.use_fused(h)
        cos, sin = self.rope_cos[batch.positions], self.rope_sin[batch.positions]  # [T, D/2] float32
        if not fused:  # HF casts cos/sin to the activation dtype before rotating (the kernel casts itself)
            cos, sin = cos.to(h.dtype), sin.to(h.dtype)
        residual = None
        for i, layer in enumerate(self.model.layers):
            h, residual = layer(h, residual, cos, sin, batch, k_cache[i], v_cache[i], attention_backend, fused)
        rows = batch.logits_rows  # norm is per row: select first
        return self.model.norm(h[rows], None if residual is None else residual[rows], fused)[0]

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [R, hidden] -> logits [R, vocab] in the model's dtype.

        Not widened to float32 here: greedy rows take the argmax of these values as they are (the float32 copy
        of a bfloat16 row holds the same numbers, so the same token wins), and sampling widens only where it
        divides by the temperature.  The float32 copies of [R, 128k] logits took about 3.5% of llama-1b
        long-output's time at scale 1.0 (H200 profiles of 2026-12-04: copies 113 ms, then 13 ms)."""
        return self.lm_head(hidden)
