"""Load a local Hugging Face checkpoint: config.json, safetensors weights, tokenizer.

Only local directories (no hub downloads): batch jobs run where the weights
already are.  The files are checked first (files.py: the config runs, every
safetensors file is whole and its tensors are those the config implies), so a
bad checkpoint is an error naming the file, not a failure halfway through.
The model is built on the meta device and the checkpoint tensors are assigned
in place, so there is no random-init cost and no second copy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .files import check_checkpoint, has_tokenizer, missing_tokenizer_message, model_dir, read_config
from .files import weight_files  # noqa: F401 - the loader's API, kept where callers look for it
from .model import CausalLM, ModelArgs

def _read_tensors(files: list[Path], wanted: set[str], dtype: torch.dtype,
                  device: torch.device) -> dict[str, torch.Tensor]:
    """Wanted tensors of every file, cast to dtype on device; others (old rotary buffers) are skipped."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                if name in wanted:
                    tensors[name] = f.get_tensor(name).to(dtype)
    return tensors


def load_checkpoint(path: str | Path, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> tuple[CausalLM, ModelArgs]:
    """Build the model of `path` on `device` in `dtype`, weights loaded, in eval mode."""
    device = torch.device(device)
    args, files = check_checkpoint(path)
    with torch.device("meta"):
        model = CausalLM(args)
    wanted = set(model.state_dict())
    if args.tie_word_embeddings:
        wanted.discard("lm_head.weight")  # tied: the embedding is the head, whatever the file holds
    tensors = _read_tensors(files, wanted, dtype, device)
    missing = sorted(wanted - tensors.keys())
    if missing:
        raise ValueError(f"checkpoint {Path(path)} is missing {len(missing)} tensors, e.g. {missing[:5]}")
    model.load_state_dict(tensors, strict=False, assign=True)
    del tensors  # the model holds the only references now, so fusing frees the separate projections
    if args.tie_word_embeddings:
        model.tie_weights()
    model.fuse_projections()
    return model.to(device).eval(), args


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer (`transformers.AutoTokenizer`), from local files only.

    A folder without tokenizer files (weights only) is a FileNotFoundError naming it and the files it lacks,
    before transformers would try to build one from the config's model type.
    """
    from transformers import AutoTokenizer
    folder = model_dir(path)
    if not has_tokenizer(folder):
        raise FileNotFoundError(missing_tokenizer_message(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def eos_token_ids(path: str | Path, tokenizer: Any = None) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json, else config.json, else the tokenizer's."""
    path = model_dir(path)
    generation = path / "generation_config.json"
    if generation.is_file():
        ids = _as_ids(json.loads(generation.read_text()).get("eos_token_id"))
        if ids:
            return ids
    ids = _as_ids(read_config(path).get("eos_token_id"))
    if ids:
        return ids
    return _as_ids(getattr(tokenizer, "eos_token_id", None))


def max_model_len(args: ModelArgs) -> int:
    """Longest prompt + completion the model takes (its RoPE table length)."""
    return args.max_position_embeddings
