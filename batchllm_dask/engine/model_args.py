"""A decoder's shape and numerics read from a Hugging Face config.json, without torch.

`ModelArgs.from_hf_config` is the one place that says which checkpoints run
(the architectures, RoPE types and attention kinds the model implements), so
that the client can check a checkpoint (files.py) before any worker loads it,
without importing torch.  model.py builds the torch modules from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
