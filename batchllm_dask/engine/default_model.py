"""The embedded default model: a tiny random-weight checkpoint built locally, no download.

It is a real Hugging Face checkpoint (config.json, safetensors, tokenizer.json,
chat template, generation_config.json), so it goes through exactly the same
loading path as a downloaded model and transformers can run it as the
reference.  The tokenizer is byte-level BPE with no merges: every UTF-8 byte is
one token, so any text round-trips.

`default_model_path()` builds it once per cache folder; parallel processes
(dask workers) build into private temp folders and rename atomically, the
first rename wins.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Bump when the recipe below changes: a new version builds into a new folder.
DEFAULT_MODEL_VERSION = "tiny-llama-v1"
# head_dim 64 so that the Triton attention kernels take the default model on a GPU.
DEFAULT_MODEL_OVERRIDES: dict[str, Any] = {"hidden_size": 256, "intermediate_size": 512, "head_dim": 64}

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
             # std 0.2, not HF's 0.02: the layers then outweigh the embeddings, so greedy output varies
             # with the prompt and the logits are peaked enough that near-ties (bf16 vs fp32) are rare.
             initializer_range=0.2)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rope_parameters": _LLAMA3_ROPE},
    "qwen2": {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "tie_word_embeddings": True},
    "mistral": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "sliding_window": None},
}


def build_tokenizer() -> Any:
    """Byte-level BPE over the 256 byte symbols, no merges, plus BOS/EOS/PAD and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # Token id == byte value (readable ids in tests).
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(byte_symbols())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS, EOS, PAD])
    bos_id = tok.token_to_id(BOS)
    # Llama 3 style: plain encodes start with BOS (the chat template writes its own).
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE)


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (the ByteLevel alphabet), by byte value."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    unprintable = iter(range(256, 512))  # the others map to 256, 257, ... in byte order
    return [chr(b) if b in printable else chr(next(unprintable)) for b in range(256)]


def _hf_classes(arch: str) -> tuple[Any, Any]:
    import transformers
    names = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
    if arch not in names:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {sorted(names)}")
    prefix = names[arch]
    return getattr(transformers, f"{prefix}Config"), getattr(transformers, f"{prefix}ForCausalLM")


def build_tiny_checkpoint(path: str | Path, arch: str = "llama", seed: int = 0, sharded: bool = False,
                          **config_overrides: Any) -> Path:
    """Write a tiny random-weight `arch` checkpoint ("llama", "qwen2", "mistral") into `path`.

    config_overrides go to the transformers config class (e.g. tie_word_embeddings=True,
    head_dim=64).  sharded=True writes several safetensors shards and an index.
    """
    import torch
    from transformers import GenerationConfig

    config_cls, model_cls = _hf_classes(arch)
    path = Path(path)
    tokenizer = build_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = config_cls(**{**_BASE, **_ARCH_DEFAULTS[arch], "vocab_size": len(tokenizer), **ids,
                           **config_overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    _perturb_init(model, config.initializer_range)
    model.generation_config = GenerationConfig(**ids)
    with _quiet_progress():
        model.save_pretrained(path, max_shard_size="100KB" if sharded else "50GB")
    tokenizer.save_pretrained(path)
    return path


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No "Writing model shards" progress bar for a checkpoint of a few hundred kilobytes."""
    from transformers.utils import logging as hf_logging
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _perturb_init(model: Any, std: float) -> None:
    """Random biases and norm weights (HF inits them to 0 and 1), so a loader that drops one is caught."""
    import torch
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, std)
            elif name.endswith("norm.weight"):
                param.normal_(1.0, 0.1)


def _cache_root(cache_dir: str | Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "batchllm_dask"


def default_model_path(cache_dir: str | Path | None = None) -> Path:
    """The default model's folder, built on first use (`$XDG_CACHE_HOME/batchllm_dask/<version>`)."""
    final = _cache_root(cache_dir) / DEFAULT_MODEL_VERSION
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_VERSION}-", dir=final.parent))
    try:
        build_tiny_checkpoint(tmp, arch="llama", seed=0, **DEFAULT_MODEL_OVERRIDES)
        os.rename(tmp, final)  # atomic; fails if another process got there first
    except OSError:
        if not (final / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
