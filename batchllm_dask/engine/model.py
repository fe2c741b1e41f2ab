"""A Llama-family decoder in plain torch: Llama 2/3.x, Qwen2/2.5, Mistral.

One readable file in the gpt-fast manner.  Parameter names are the Hugging Face
checkpoint names (`model.layers.0.self_attn.q_proj.weight`, ...), so loading is
a plain state-dict mapping.  The numerics follow transformers step by step
(RMSNorm in float32 then cast back, RoPE tables in float32 cast to the
activation dtype, SiLU-gated MLP) so that greedy tokens match HF's `generate`.

The model sees packed tokens, not [batch, seq] tensors: one `ForwardBatch` of
T tokens from many requests, with attention done over the paged KV pool by
`kernels.paged_attention` (the one attention seam).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import paged_attention, write_kv
from .batch import ForwardBatch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3")


@dataclass(frozen=True)
class ModelArgs:
    """Shape and numerics of a decoder; `from_hf_config` reads a config.json dict.

    rope_type "llama3" uses rope_factor, rope_low_freq_factor,
    rope_high_freq_factor and rope_original_max_position (Llama 3.1 scaling).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope type {self.rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Parse a Hugging Face config.json dict (transformers 4.x and 5.x layouts)."""
        model_type = _check_architecture(cfg)
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
        num_heads = cfg["num_attention_heads"]
        max_pos = cfg.get("max_position_embeddings", 2048)
        _check_full_attention(cfg, model_type, max_pos)
        is_qwen2 = model_type == "qwen2"
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            max_position_embeddings=max_pos,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            qkv_bias=is_qwen2 or bool(cfg.get("attention_bias", False)),
            o_bias=not is_qwen2 and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            model_type=model_type,
            **_rope_fields(cfg, max_pos),
        )


def _check_architecture(cfg: dict[str, Any]) -> str:
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or []
    unsupported = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
    if model_type not in SUPPORTED_MODEL_TYPES or unsupported:
        name = unsupported[0] if unsupported else model_type
        raise ValueError(f"unsupported architecture {name!r} (model_type={model_type!r}); supported model types: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} ({', '.join(SUPPORTED_ARCHITECTURES)})")
    return model_type


def _check_full_attention(cfg: dict[str, Any], model_type: str, max_pos: int) -> None:
    """Sliding-window attention is not implemented: refuse a window that could bind."""
    window = cfg.get("sliding_window")
    if model_type == "llama" or window is None or window >= max_pos:
        return
    if model_type == "qwen2":
        layer_types = cfg.get("layer_types")
        if layer_types is not None:
            sliding = "sliding_attention" in layer_types
        else:  # Qwen2 slides only when use_sliding_window, on layers >= max_window_layers
            sliding = bool(cfg.get("use_sliding_window")) and cfg.get("max_window_layers", 0) < cfg["num_hidden_layers"]
        if not sliding:
            return
    raise ValueError(f"sliding-window attention is not supported ({model_type}: sliding_window={window} < "
                     f"max_position_embeddings={max_pos}); only full-attention checkpoints run")


def _rope_fields(cfg: dict[str, Any], max_pos: int) -> dict[str, Any]:
    """RoPE settings from either layout.

    transformers 5 writes one `rope_parameters` dict ({"rope_type", "rope_theta",
    "factor", ...}); 4.x wrote a top-level `rope_theta` and a `rope_scaling`
    dict ({"rope_type" or "type", "factor", ...}, or null).
    """
    params = dict(cfg.get("rope_scaling") or {})
    params.update(_single_rope_parameters(cfg.get("rope_parameters") or {}))
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    fields: dict[str, Any] = {"rope_type": rope_type,
                              "rope_theta": float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)}
    if rope_type == "llama3":
        fields.update(rope_factor=float(params["factor"]),
                      rope_low_freq_factor=float(params["low_freq_factor"]),
                      rope_high_freq_factor=float(params["high_freq_factor"]),
                      rope_original_max_position=int(cfg.get("original_max_position_embeddings")
                                                     or params.get("original_max_position_embeddings") or max_pos))
    return fields


def _single_rope_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """One RoPE dict; a per-layer-type dict ({"full_attention": {...}, ...}) must agree across layers."""
    nested = [v for v in params.values() if isinstance(v, dict)]
    if not nested:
        return params
    if any(v != nested[0] for v in nested) or len(nested) != len(params):
        raise ValueError(f"per-layer RoPE parameters are not supported: {params!r}")
    return nested[0]


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


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (HF layout).  x: [T, H, D]; cos, sin: [T, D/2] already in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # float32 statistics, cast back before the weight: HF's exact order of operations.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.sm_scale = args.head_dim ** -0.5
        q_dim, kv_dim = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, q_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, kv_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, kv_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_dim, args.hidden_size, bias=args.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, batch: ForwardBatch, k_cache: Tensor,
                v_cache: Tensor, backend: str) -> Tensor:
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)  # q: [T, Hq, D]
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)  # k: [T, Hkv, D]
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        write_kv(k_cache, v_cache, k, v, batch.slot_mapping)
        o = paged_attention(q, k_cache, v_cache, batch.attention, self.sm_scale, backend)  # o: [T, Hq, D]
        return self.o_proj(o.reshape(t, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, batch: ForwardBatch, k_cache: Tensor,
                v_cache: Tensor, backend: str) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, batch, k_cache, v_cache, backend)
        return h + self.mlp(self.post_attention_layernorm(h))


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
    """

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
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

    def forward(self, batch: ForwardBatch, k_cache: Tensor, v_cache: Tensor,
                attention_backend: str = "auto") -> Tensor:
        """Run the T packed tokens; write their K/V; return final-normed hidden [R, hidden] of logits_rows."""
        h = self.model.embed_tokens(batch.input_ids)  # h: [T, hidden]
        # HF computes cos/sin in float32 and casts them to the activation dtype before rotating.
        cos = self.rope_cos[batch.positions].to(h.dtype)  # [T, D/2]
        sin = self.rope_sin[batch.positions].to(h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, batch, k_cache[i], v_cache[i], attention_backend)
        return self.model.norm(h[batch.logits_rows])  # norm is per row: select first

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden [R, hidden] -> logits [R, vocab] float32."""
        return self.lm_head(hidden).float()
