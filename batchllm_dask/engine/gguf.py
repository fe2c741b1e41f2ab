"""GGUF models: a `.gguf` file dequantized into an ordinary safetensors checkpoint folder.

The engine loads one format only (config.json + safetensors + tokenizer,
loader.py).  A GGUF file (llama.cpp's format: quantized weights, the config
and the tokenizer in one file) is turned into that format once, with
transformers' own GGUF reader (it needs the `gguf` package), which knows each
architecture's tensor names and dequantizes every block format:

- `convert_tokenizer` writes config.json, generation_config.json and the
  tokenizer files: enough to tokenize and plan, a few seconds.
- `convert_checkpoint` writes the same plus the weights, dequantized to the
  requested dtype (the dequantized values are float32; a bf16 or fp16 folder
  is rounded once, here).

Where the converted folders live and when they are rebuilt is
`model_cache.py`'s business.
"""
from __future__ import annotations

from pathlib import Path

SUFFIX = ".gguf"


def find_gguf(path: str | Path) -> Path | None:
    """The GGUF file `path` names: the file itself, or the single .gguf of a folder without config.json.

    None when `path` is not a GGUF model (an ordinary checkpoint folder, or nothing at all).  A folder with
    several .gguf files is ambiguous: ValueError naming them.
    """
    path = Path(path).expanduser()
    if path.is_file() and path.name.lower().endswith(SUFFIX):
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(p for p in path.iterdir() if p.name.lower().endswith(SUFFIX) and p.is_file())
    if len(files) > 1:
        raise ValueError(f"model: {path} holds several GGUF files {[f.name for f in files]}; name one of them")
    return files[0] if files else None


def _hf_config(gguf_file: Path):
    from transformers import AutoConfig
    return AutoConfig.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


def convert_tokenizer(gguf_file: Path, out: Path) -> Path:
    """config.json, generation_config.json and the tokenizer of `gguf_file`, written into `out` (no weights)."""
    from transformers import AutoTokenizer, GenerationConfig
    config = _hf_config(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def convert_checkpoint(gguf_file: Path, out: Path, dtype: str) -> Path:
    """A full checkpoint folder of `gguf_file` in `out`: config, tokenizer and safetensors weights in `dtype`."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    convert_tokenizer(gguf_file, out)
    with torch.device("meta"):  # only for transformers' map of GGUF tensor names to its parameter names
        skeleton = AutoModelForCausalLM.from_config(_hf_config(gguf_file))
    tensors = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=skeleton,
                                   torch_dtype=torch_dtype)["tensors"]
    save_file({k: v.to(torch_dtype).contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt", "source": gguf_file.name})
    return out
