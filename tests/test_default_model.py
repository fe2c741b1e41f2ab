"""The embedded default model: built once, loads like any checkpoint, its tokenizer round-trips text."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm_dask.engine import default_model
from batchllm_dask.engine.default_model import DEFAULT_MODEL_VERSION, byte_symbols, default_model_path
from batchllm_dask.engine.loader import eos_token_ids, load_checkpoint, load_tokenizer


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return default_model_path(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tokenizer(built):
    return load_tokenizer(built)


def test_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    real_build = default_model.build_tiny_checkpoint
    monkeypatch.setattr(default_model, "build_tiny_checkpoint",
                        lambda *a, **k: calls.append(1) or real_build(*a, **k))
    first = default_model_path()
    assert first == tmp_path / "batchllm_dask" / DEFAULT_MODEL_VERSION and len(calls) == 1
    assert default_model_path() == first and len(calls) == 1
    assert [p.name for p in first.parent.iterdir()] == [DEFAULT_MODEL_VERSION]  # no temp folders left


def test_parallel_builds_are_safe(tmp_path):
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(default_model_path(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(paths) == 3 and len(set(paths)) == 1
    assert (paths[0] / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [DEFAULT_MODEL_VERSION]


def test_loads_through_the_ordinary_path(built, tokenizer):
    model, args = load_checkpoint(built, torch.float32, "cpu")
    assert args.model_type == "llama" and args.rope_type == "llama3" and args.head_dim == 64
    assert args.vocab_size == len(tokenizer)
    assert eos_token_ids(built, tokenizer) == (tokenizer.convert_tokens_to_ids("<|end_of_text|>"),)
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.bos_token == "<|begin_of_text|>"


def test_greedy_output_varies_across_prompts(built, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(built, dtype=torch.float32).eval()
    outputs = set()
    for prompt in ["hello", "The quick brown fox", "12345", "zzz"]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        tokens = out[0, ids.shape[1]:].tolist()
        assert len(set(tokens)) > 2  # not one token repeated
        outputs.add(tuple(tokens))
    assert len(outputs) == 4


def test_byte_symbols_are_the_byte_level_alphabet():
    from tokenizers import pre_tokenizers
    assert set(byte_symbols()) == set(pre_tokenizers.ByteLevel.alphabet()) and len(byte_symbols()) == 256


@settings(max_examples=60, deadline=None)
@given(text=st.text())
def test_tokenizer_round_trips_unicode(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_bytes_are_tokens(tokenizer):
    assert tokenizer.encode("a€", add_special_tokens=False) == [ord("a"), *"€".encode()]


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|begin_of_text|><|system|>\nBe brief.<|end_of_text|><|user|>\nHi!<|end_of_text|><|assistant|>\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(tokenizer.bos_token_id) == 1
