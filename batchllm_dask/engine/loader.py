"""Load a local Hugging Face checkpoint: config.json, safetensors weights, tokenizer.

Only local directories (no hub downloads): batch jobs run where the weights
already are.  The model is built on the meta device and the checkpoint tensors
are assigned in place, so there is no random-init cost and no second copy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .model import CausalLM, ModelArgs

_INDEX = "model.safetensors.index.json"


def _model_dir(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    return path


def read_config(path: str | Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict."""
    config = _model_dir(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no config.json in model directory {config.parent}")
    return json.loads(config.read_text())


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, else every *.safetensors."""
    path = _model_dir(path)
    index = path / _INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names missing shard files: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path} (only safetensors checkpoints are supported)")
    return files


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
    args = ModelArgs.from_hf_config(read_config(path))
    files = weight_files(path)
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
    """The checkpoint's tokenizer (`transformers.AutoTokenizer`), from local files only."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(_model_dir(path)))


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def eos_token_ids(path: str | Path, tokenizer: Any = None) -> tuple[int, ...]:
    """End-of-sequence ids: generation_config.json, else config.json, else the tokenizer's."""
    path = _model_dir(path)
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
