"""CausalLM against transformers (fp32, CPU, reference attention) and the loader's errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from batchllm_dask.engine.batch import ForwardBatch
from batchllm_dask.engine.default_model import build_tiny_checkpoint
from batchllm_dask.engine.loader import eos_token_ids, load_checkpoint, load_tokenizer, max_model_len
from batchllm_dask.engine.model import CausalLM, ModelArgs, rope_inv_freq
from batchllm_dask.kernels import AttentionWork

transformers = pytest.importorskip("transformers")

PAGE_SIZE = 4
PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_llama_dir, tiny_qwen_dir) -> dict[str, Path]:
    def build(name: str, **kwargs) -> Path:
        return build_tiny_checkpoint(tmp_path_factory.mktemp(name), **kwargs)
    return {
        "llama": tiny_llama_dir,
        "qwen2-tied": tiny_qwen_dir,
        "mistral": build("mistral", arch="mistral", seed=1),
        "llama-tied": build("llama-tied", arch="llama", seed=2, tie_word_embeddings=True),
        "qwen2-untied": build("qwen2-untied", arch="qwen2", seed=3, tie_word_embeddings=False),
    }


def hf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


class PagedSequence:
    """One sequence's KV pages in a fresh pool, laid out out of order on purpose."""

    def __init__(self, args: ModelArgs, pages: list[int], num_pages: int = 32, device: str = "cpu",
                 dtype: torch.dtype = torch.float32):
        shape = (args.num_layers, num_pages, PAGE_SIZE, args.num_kv_heads, args.head_dim)
        # Poisoned: a slot read before it is written turns the output into NaN.
        self.k_cache = torch.full(shape, float("nan"), device=device, dtype=dtype)
        self.v_cache = torch.full(shape, float("nan"), device=device, dtype=dtype)
        self.pages, self.device = pages, device

    def slots(self, start: int, end: int) -> torch.Tensor:
        return torch.tensor([self.pages[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for p in range(start, end)])

    def chunk(self, ids: list[int], start: int, end: int) -> ForwardBatch:
        """A causal prefill chunk of tokens [start, end) over the cached tokens [0, start)."""
        work = AttentionWork.from_lists([0], [end - start], [end], [1], [self.pages], self.device)
        as_t = lambda x: torch.as_tensor(x, device=self.device)  # noqa: E731
        return ForwardBatch(as_t(ids[start:end]), as_t(range(start, end)), as_t(self.slots(start, end)), work,
                            as_t(range(end - start)))


def our_logits(model: CausalLM, args: ModelArgs, ids: list[int], cuts: tuple[int, ...] = (),
               device: str = "cpu") -> torch.Tensor:
    seq = PagedSequence(args, pages=[9, 2, 30, 5, 17, 0, 11, 23, 4, 28, 14, 7], device=device)
    bounds = [0, *cuts, len(ids)]
    out = []
    with torch.no_grad():
        for start, end in zip(bounds, bounds[1:]):
            hidden = model(seq.chunk(ids, start, end), seq.k_cache, seq.v_cache, attention_backend="torch")
            out.append(model.compute_logits(hidden))
    return torch.cat(out).cpu()


@pytest.mark.parametrize("name", ["llama", "qwen2-tied", "mistral", "llama-tied", "qwen2-untied"])
def test_logits_match_transformers(checkpoints, name):
    path = checkpoints[name]
    model, args = load_checkpoint(path, torch.float32, "cpu")
    ids = load_tokenizer(path)(PROMPT).input_ids
    ours = our_logits(model, args, ids)
    assert ours.dtype == torch.float32 and ours.shape == (len(ids), args.vocab_size)
    torch.testing.assert_close(ours, hf_logits(path, ids), atol=1e-4, rtol=1e-4)


def test_tied_head_is_the_embedding(checkpoints):
    tied, _ = load_checkpoint(checkpoints["qwen2-tied"], torch.float32, "cpu")
    untied, _ = load_checkpoint(checkpoints["llama"], torch.float32, "cpu")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)


def test_chunked_prefill_equals_one_shot(tiny_llama_dir):
    model, args = load_checkpoint(tiny_llama_dir, torch.float32, "cpu")
    ids = load_tokenizer(tiny_llama_dir)(PROMPT).input_ids
    one_shot = our_logits(model, args, ids)
    torch.testing.assert_close(our_logits(model, args, ids, cuts=(13,)), one_shot, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(our_logits(model, args, ids, cuts=(5, 6, 30)), one_shot, atol=1e-5, rtol=1e-5)


def test_packed_sequences_equal_separate_runs(tiny_qwen_dir):
    """Two sequences in one forward batch (two work items, own pages) = each run alone."""
    model, args = load_checkpoint(tiny_qwen_dir, torch.float32, "cpu")
    tok = load_tokenizer(tiny_qwen_dir)
    a, b = tok("hello world").input_ids, tok("a different, longer prompt").input_ids
    seq = PagedSequence(args, pages=[3, 8, 1, 12, 6, 10, 0, 5, 2, 14])
    pages_a, pages_b = [3, 8, 1], [12, 6, 10, 0, 5, 2, 14]
    slots_a = [pages_a[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for p in range(len(a))]
    slots_b = [pages_b[p // PAGE_SIZE] * PAGE_SIZE + p % PAGE_SIZE for p in range(len(b))]
    work = AttentionWork.from_lists([0, len(a)], [len(a), len(b)], [len(a), len(b)], [1, 1], [pages_a, pages_b])
    batch = ForwardBatch(torch.tensor(a + b), torch.tensor([*range(len(a)), *range(len(b))]),
                         torch.tensor(slots_a + slots_b), work, torch.tensor([len(a) - 1, len(a) + len(b) - 1]))
    with torch.no_grad():
        logits = model.compute_logits(model(batch, seq.k_cache, seq.v_cache, "torch"))
    torch.testing.assert_close(logits[0], our_logits(model, args, a)[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], our_logits(model, args, b)[-1], atol=1e-5, rtol=1e-5)


def greedy_decode(model: CausalLM, args: ModelArgs, ids: list[int], steps: int, eos: set[int],
                  device: str = "cpu") -> list[int]:
    """Prefill, then one-token decode steps (q_len 1 against the paged cache)."""
    seq = PagedSequence(args, pages=list(range(31, -1, -1)), device=device, dtype=model.lm_head.weight.dtype)
    out: list[int] = []
    with torch.no_grad():
        hidden = model(seq.chunk(ids, 0, len(ids)), seq.k_cache, seq.v_cache, "torch")
        while len(out) < steps:
            token = int(model.compute_logits(hidden)[-1].argmax())
            out.append(token)
            if token in eos:
                break
            ids = ids + [token]
            hidden = model(seq.chunk(ids, len(ids) - 1, len(ids)), seq.k_cache, seq.v_cache, "torch")
    return out


@pytest.mark.parametrize("name", ["llama", "qwen2-tied"])
def test_greedy_decode_matches_hf_generate(checkpoints, name):
    path = checkpoints[name]
    model, args = load_checkpoint(path, torch.float32, "cpu")
    tok = load_tokenizer(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for prompt in ["hello", "The quick brown fox", "日本語のテキスト"]:
        ids = tok(prompt).input_ids
        expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
        assert greedy_decode(model, args, ids, 12, set(eos_token_ids(path, tok))) == expected


def test_sharded_checkpoint_loads(tmp_path, tiny_llama_dir):
    path = build_tiny_checkpoint(tmp_path / "sharded", arch="llama", sharded=True)
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) > 1
    sharded, args = load_checkpoint(path, torch.float32, "cpu")
    single, _ = load_checkpoint(tiny_llama_dir, torch.float32, "cpu")
    for (name, a), (_, b) in zip(sharded.state_dict().items(), single.state_dict().items()):
        assert torch.equal(a, b), name
    assert max_model_len(args) == 2048


def test_dtype_and_eval_mode(tiny_llama_dir):
    model, _ = load_checkpoint(tiny_llama_dir, torch.bfloat16, "cpu")
    assert not model.training
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert model.rope_cos.dtype == torch.float32


def test_eos_ids(tiny_llama_dir):
    tok = load_tokenizer(tiny_llama_dir)
    assert eos_token_ids(tiny_llama_dir, tok) == (tok.eos_token_id,)


# -------------------------------------------------------------------------------------- config parsing

LLAMA31 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}
LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def test_rope_layouts_old_and_new_agree():
    old = ModelArgs.from_hf_config({**LLAMA31, "rope_theta": 500000.0,
                                    "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING}})
    new = ModelArgs.from_hf_config({**LLAMA31, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                                                   **LLAMA3_SCALING}})
    assert old == new and new.rope_type == "llama3" and new.rope_theta == 500000.0 and new.head_dim == 128
    plain = ModelArgs.from_hf_config({**LLAMA31, "rope_theta": 10000.0, "rope_scaling": None})
    assert plain.rope_type == "default" and plain.rope_theta == 10000.0


@pytest.mark.parametrize("name", ["llama", "qwen2-tied", "mistral"])
def test_inv_freq_is_bitwise_hf(checkpoints, name):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = transformers.AutoConfig.from_pretrained(checkpoints[name])
    args = ModelArgs.from_hf_config(json.loads((checkpoints[name] / "config.json").read_text()))
    rope_type = config.rope_parameters["rope_type"]
    if rope_type == "default":
        expected = 1.0 / (config.rope_parameters["rope_theta"]
                          ** (torch.arange(0, args.head_dim, 2, dtype=torch.float) / args.head_dim))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    assert torch.equal(rope_inv_freq(args), expected)


@pytest.mark.parametrize("rope", [{"type": "linear", "factor": 2.0}, {"rope_type": "yarn", "factor": 4.0}])
def test_unsupported_rope_type(rope):
    with pytest.raises(ValueError, match="rope type"):
        ModelArgs.from_hf_config({**LLAMA31, "rope_scaling": rope})


def test_sliding_window_rules():
    mistral = {**LLAMA31, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
               "max_position_embeddings": 32768}
    with pytest.raises(ValueError, match="sliding"):
        ModelArgs.from_hf_config({**mistral, "sliding_window": 4096})
    assert ModelArgs.from_hf_config({**mistral, "sliding_window": 32768}).model_type == "mistral"
    assert ModelArgs.from_hf_config({**mistral, "sliding_window": None}).model_type == "mistral"
    qwen = {**LLAMA31, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
            "max_position_embeddings": 32768, "sliding_window": 4096, "max_window_layers": 21}
    assert ModelArgs.from_hf_config({**qwen, "use_sliding_window": False}).qkv_bias
    with pytest.raises(ValueError, match="sliding"):
        ModelArgs.from_hf_config({**qwen, "use_sliding_window": True})


# ---------------------------------------------------------------------------------------- loader errors

def test_unsupported_architecture(tmp_path):
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768}
    (tmp_path / "config.json").write_text(json.dumps(gpt2))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*llama"):
        load_checkpoint(tmp_path, torch.float32, "cpu")


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_checkpoint(tmp_path / "no-such-model", torch.float32, "cpu")


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_checkpoint(tmp_path, torch.float32, "cpu")


def test_no_safetensors(tmp_path, tiny_llama_dir):
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_checkpoint(tmp_path, torch.float32, "cpu")


def test_missing_tensor(tmp_path, tiny_llama_dir):
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        load_checkpoint(tmp_path, torch.float32, "cpu")


# ------------------------------------------------------------------------------------------------- GPU

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_cuda_fp32_logits_match_transformers(tiny_llama_dir):
    model, args = load_checkpoint(tiny_llama_dir, torch.float32, "cuda")
    assert model.rope_cos.is_cuda and model.lm_head.weight.is_cuda
    ids = load_tokenizer(tiny_llama_dir)(PROMPT).input_ids
    ours = our_logits(model, args, ids, device="cuda")
    torch.testing.assert_close(ours, hf_logits(tiny_llama_dir, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_greedy_matches_hf_generate(tiny_llama_dir, dtype):
    """Greedy tokens on the GPU against HF's generate in the same dtype (bf16 near-ties are counted)."""
    model, args = load_checkpoint(tiny_llama_dir, dtype, "cuda")
    tok = load_tokenizer(tiny_llama_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype).cuda().eval()
    prompts = ["hello", "The quick brown fox", "日本語のテキスト", "0123456789", PROMPT]
    mismatched = []
    for prompt in prompts:
        ids = tok(prompt).input_ids
        x = torch.tensor([ids], device="cuda")
        expected = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16,
                               do_sample=False)[0, len(ids):].tolist()
        got = greedy_decode(model, args, ids, 16, set(eos_token_ids(tiny_llama_dir, tok)), "cuda")
        if got != expected:
            mismatched.append((prompt, got, expected))
    print(f"{dtype}: {len(mismatched)}/{len(prompts)} prompts differ from HF: {mismatched}")
    assert not mismatched if dtype == torch.float32 else len(mismatched) <= 1

