"""Checks of a model's files before anything loads them: each problem a clear error naming the file.

A batch job must fail in its first second, on the client, when the checkpoint it names cannot run, not
hours later on a worker with an error from deep inside transformers or safetensors.  `check_model` reads
only small things, and imports no torch:

- config.json, parsed by `ModelArgs.from_hf_config` (the one place that says which architectures run);
- every safetensors file's header (its first 8 + n bytes: tensor names, dtypes, shapes, byte offsets):
  a file shorter than its header says (a copy or download cut short) is caught here, not as a crash in the
  middle of loading; the names and shapes are compared with those the config implies (`expected_shapes`),
  so weights of another model, or a config of another size, are refused before a byte of weights is read;
- the index of a sharded checkpoint: every shard it names must exist and hold the tensors it lists;
- the first four bytes of a GGUF file;
- the tokenizer files.  A folder of weights and config alone (what `model.save_pretrained` writes) is a
  valid checkpoint for token-id prompts; only text and chat prompts need a tokenizer, which the
  `tokenizer=` option may take from another folder (`ModelCheck.tokenizer_dir`).

Errors: `FileNotFoundError` for something absent, `ValueError` for something present but wrong.

    check_model("/models/llama-3-8b")             # raises, or says what it found
    check_visible_model(path, tokenizer)          # the client's check: skipped where the path is not here
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import gguf
from .model_args import SUPPORTED_ARCHITECTURES, ModelArgs

INDEX = "model.safetensors.index.json"
# Any one of these makes a folder's tokenizer loadable (fast tokenizer, sentencepiece, GPT-2 BPE, WordPiece).
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
TOKENIZER_FILES = "tokenizer.json, tokenizer.model or vocab.json, with tokenizer_config.json"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
_MAX_HEADER = 100 << 20  # safetensors itself refuses headers above 100 MB
_GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype name ("BF16", ...), shape, byte range in the data section."""

    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]


@dataclass(frozen=True)
class ModelCheck:
    """What `check_model` found.

    path: the checkpoint folder, or the GGUF file (its weights are checked when it is converted).
    args: the decoder's shape (None for a GGUF file: its config is inside, read at conversion).
    weight_files: the safetensors files (empty for a GGUF file).
    tokenizer_dir: where the tokenizer loads from (the `tokenizer` option, else the model); None when
        there is none: the model runs token-id prompts only.
    """

    path: Path
    args: ModelArgs | None
    weight_files: tuple[Path, ...]
    tokenizer_dir: Path | None


# ------------------------------------------------------------------------------------- the entry points

def check_model(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> ModelCheck:
    """Check the model `model` names (a checkpoint folder or a GGUF file) and its tokenizer; raise on a problem.

    tokenizer: the `tokenizer=` option (a folder with tokenizer files, or a GGUF file), which must then hold
    one; without it the model's own tokenizer files are used if it has them.
    """
    path, file = _existing("model", model, "a checkpoint folder or a .gguf file")
    if file is not None:
        return ModelCheck(file, None, (), _tokenizer_of(tokenizer) if tokenizer is not None else file)
    if path.is_file():
        raise ValueError(f"model: {path} is a file, but a model is a checkpoint folder (config.json and "
                         f"*.safetensors) or a GGUF file (.gguf)")
    args, files = check_checkpoint(path)
    if tokenizer is not None:
        return ModelCheck(path, args, tuple(files), _tokenizer_of(tokenizer))
    return ModelCheck(path, args, tuple(files), path if has_tokenizer(path) else None)


def check_visible_model(model: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> ModelCheck | None:
    """`check_model` where this machine sees the files; None (nothing checked) where it does not.

    The client of a cluster may not see the paths its workers load from; those are checked when a worker
    loads them.  A tokenizer path that is not here is likewise left to the workers.
    """
    if not Path(model).expanduser().exists():
        return None
    visible = tokenizer is not None and Path(tokenizer).expanduser().exists()
    return check_model(model, tokenizer if visible else None)


def check_checkpoint(path: str | os.PathLike) -> tuple[ModelArgs, list[Path]]:
    """(ModelArgs, safetensors files) of a checkpoint folder whose config runs and whose weights fit it."""
    path = model_dir(path)
    args = model_args(path)
    files = weight_files(path)
    check_weights(path, args, files)
    return args, files


def model_dir(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    return path


# ------------------------------------------------------------------------------------- config

def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's config.json as a dict (FileNotFoundError / ValueError naming the file)."""
    folder = model_dir(path)
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no config.json in model directory {folder} (it holds: {_listing(folder)})")
    try:
        value = json.loads(config.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{config}: expected a JSON object, got {type(value).__name__}")
    return value


def model_args(path: str | os.PathLike) -> ModelArgs:
    """The decoder config.json describes, or a ValueError naming config.json and what it cannot run."""
    config = Path(path) / "config.json"
    cfg = read_config(path)
    try:
        return ModelArgs.from_hf_config(cfg)
    except KeyError as exc:
        raise ValueError(f"{config}: field {exc.args[0]!r} is missing (model_type={cfg.get('model_type')!r}); "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}") from None
    except (TypeError, ValueError, ZeroDivisionError) as exc:
        raise ValueError(f"{config}: {exc}") from None


# ------------------------------------------------------------------------------------- weights

def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, else every *.safetensors."""
    path = model_dir(path)
    index = path / INDEX
    if index.is_file():
        files = [path / name for name in sorted(set(_weight_map(index).values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shard files that are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
        hint = f"; it has {other}: convert it to safetensors" if other else ""
        raise FileNotFoundError(f"no *.safetensors weights in {path} (only safetensors checkpoints load{hint})")
    return files


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{index}: not a safetensors index (a JSON object with a 'weight_map'): {exc!r}") from None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return weight_map


def read_safetensors_header(file: str | os.PathLike) -> dict[str, TensorEntry]:
    """The tensors a safetensors file holds, from its header; ValueError naming the file if it is cut short.

    Layout: 8 bytes little-endian header length n, n bytes of JSON, then the data, where each tensor's
    `data_offsets` [begin, end) must lie and match its shape and dtype.
    """
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > _MAX_HEADER:
            raise ValueError(f"{file}: not a safetensors file, or truncated: it is {size:,} bytes and does not "
                             f"start with a valid header length")
        if 8 + n > size:
            raise ValueError(f"{file}: truncated safetensors file: its header takes {8 + n:,} bytes but the file "
                             f"has {size:,} (an incomplete download or copy?)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{file}: not a safetensors file: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    entries = {name: _entry(file, name, value) for name, value in header.items()}
    _check_data_size(file, entries, size - 8 - n)
    return entries


def _entry(file: Path, name: str, value: Any) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = value["dtype"], tuple(int(d) for d in value["shape"]), value["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{file}: malformed header entry for tensor {name!r}: {value!r}") from None
    width = _DTYPE_BYTES.get(dtype)
    if width is not None and end - begin != math.prod(shape) * width:
        raise ValueError(f"{file}: tensor {name!r} of shape {list(shape)} {dtype} should take "
                         f"{math.prod(shape) * width:,} bytes, its offsets say {end - begin:,}")
    return TensorEntry(dtype, shape, (int(begin), int(end)))


def _check_data_size(file: Path, entries: dict[str, TensorEntry], data_bytes: int) -> None:
    if not entries:
        return
    name, last = max(entries.items(), key=lambda kv: kv[1].offsets[1])
    if last.offsets[1] > data_bytes:
        size = file.stat().st_size
        raise ValueError(f"{file}: truncated safetensors file: its header places tensor data up to byte "
                         f"{size - data_bytes + last.offsets[1]:,} (tensor {name!r}) but the file has {size:,} "
                         f"bytes (an incomplete download or copy?)")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The tensors (Hugging Face names) and shapes a checkpoint of `args` holds; lm_head absent when tied.

    The same as `CausalLM(args).state_dict()` before `fuse_projections` (a test checks it), computed without
    torch so the client can check weights it cannot load.
    """
    h, i = args.hidden_size, args.intermediate_size
    q, kv = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (args.vocab_size, h), "model.norm.weight": (h,)}
    if not args.tie_word_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, h)
    layer = {"input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
             "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
             "self_attn.o_proj.weight": (h, q), "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h),
             "mlp.down_proj.weight": (h, i)}
    if args.qkv_bias:
        layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if args.o_bias:
        layer["self_attn.o_proj.bias"] = (h,)
    if args.mlp_bias:
        layer.update({"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (h,)})
    for n in range(args.num_layers):
        shapes.update({f"model.layers.{n}.{k}": v for k, v in layer.items()})
    return shapes


def check_weights(path: Path, args: ModelArgs, files: list[Path]) -> None:
    """Every tensor the config implies is in the files with its shape, in a float dtype, and nothing else is."""
    found = _tensors_of(path, files)
    want = expected_shapes(args)
    config = path / "config.json"
    missing = sorted(set(want) - set(found))
    if missing:
        raise ValueError(f"{path}: the weights ({_names(files)}) lack {len(missing)} of the {len(want)} tensors "
                         f"{config} implies ({_describe(args)}), e.g. {missing[:3]}")
    extra = sorted(n for n in found if n not in want and _is_parameter(n, args))
    if extra:
        raise ValueError(f"{path}: the weights ({_names(files)}) hold {len(extra)} tensors the model {config} "
                         f"describes ({_describe(args)}) does not have, e.g. {extra[:3]}: do the config and the "
                         f"weights belong together?")
    for name, shape in want.items():
        file, entry = found[name]
        if entry.shape != shape:
            raise ValueError(f"{file}: tensor {name!r} has shape {list(entry.shape)} but {config} implies "
                             f"{list(shape)} ({_describe(args)})")
        if entry.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{file}: tensor {name!r} is {entry.dtype}; only float weights load "
                             f"({', '.join(_FLOAT_DTYPES)}); a quantized model loads from its GGUF file")


def _tensors_of(path: Path, files: list[Path]) -> dict[str, tuple[Path, TensorEntry]]:
    """name -> (file, entry) over every file; with an index, each tensor must be in the shard it names."""
    headers = {f: read_safetensors_header(f) for f in files}
    index = path / INDEX
    if index.is_file():
        for name, shard in _weight_map(index).items():
            if name not in headers[path / shard]:
                raise ValueError(f"{index} places tensor {name!r} in {shard}, which does not hold it")
    return {name: (f, entry) for f, entries in headers.items() for name, entry in entries.items()}


def _is_parameter(name: str, args: ModelArgs) -> bool:
    """Whether an unexpected tensor would be a parameter of the model (not a buffer, not a tied head)."""
    if "rotary_emb" in name or (name == "lm_head.weight" and args.tie_word_embeddings):
        return False
    return name.endswith((".weight", ".bias"))


def _describe(args: ModelArgs) -> str:
    return (f"{args.model_type}: {args.num_layers} layers, hidden_size {args.hidden_size}, "
            f"{args.num_heads} heads / {args.num_kv_heads} KV heads of {args.head_dim}, "
            f"intermediate_size {args.intermediate_size}, vocab_size {args.vocab_size}")


def _names(files: list[Path]) -> str:
    shown = ", ".join(f.name for f in files[:3])
    return shown + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def _listing(folder: Path, limit: int = 8) -> str:
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return "nothing"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


# ------------------------------------------------------------------------------------- GGUF

def check_gguf(file: str | os.PathLike) -> None:
    """ValueError naming `file` unless it starts with GGUF's magic bytes."""
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{file}: not a GGUF file (it starts with {magic!r}, a GGUF file with {_GGUF_MAGIC!r})")


# ------------------------------------------------------------------------------------- tokenizer

def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a tokenizer's vocabulary (tokenizer.json, tokenizer.model, vocab.json, ...)."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in _VOCAB_FILES) or any(folder.glob("*.tiktoken"))


def missing_tokenizer_message(folder: str | os.PathLike) -> str:
    """Why text cannot run on the weights-only checkpoint `folder`, and what to do."""
    return (f"no tokenizer: {folder} lacks the tokenizer files ({TOKENIZER_FILES}); it runs "
            f"token-id prompts only; for text or chat prompts give tokenizer=<a folder with the model's tokenizer>")


def _existing(option: str, value: str | os.PathLike, what: str) -> tuple[Path, Path | None]:
    """The path an option names, which must exist, and the GGUF file it is or holds, checked (else None)."""
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{option}: {path} does not exist ({what})")
    file = gguf.find_gguf(path)
    if file is not None:
        check_gguf(file)
    return path, file


def _tokenizer_of(tokenizer: str | os.PathLike) -> Path:
    """The folder (or GGUF file) the `tokenizer` option names, which must hold a tokenizer."""
    path, file = _existing("tokenizer", tokenizer, "a folder with tokenizer files, or a .gguf file")
    if file is not None:
        return file
    if not path.is_dir() or not has_tokenizer(path):
        raise FileNotFoundError(f"tokenizer: {path} lacks the tokenizer files ({TOKENIZER_FILES})")
    return path
