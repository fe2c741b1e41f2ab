"""Random-weight checkpoints for the benchmarks: the standard model shapes, and a tiny one for CPU checks."""
from __future__ import annotations

import gc
from pathlib import Path

from ..roofline import SHAPES


def save_random_checkpoint(path: Path, shape: str = "llama-1b", device: str = "cuda") -> Path:
    """A random-weight bf16 checkpoint of a roofline.SHAPES shape, with the embedded byte tokenizer.

    The requests are token ids, so the tokenizer only has to load; EOS is ignored.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from batchllm_dask.engine.default_model import build_tokenizer

    s = SHAPES[shape]
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         head_dim=s.head_dim, max_position_embeddings=8192, tie_word_embeddings=shape == "llama-1b")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def save_tiny_checkpoint(path: Path, vocab: int, **overrides) -> Path:
    from batchllm_dask.engine.default_model import build_tiny_checkpoint
    return build_tiny_checkpoint(path, arch="llama", vocab_size=vocab, **overrides)
