"""Checkpoints a user actually has: broken ones are refused with the file and the problem named, before any
work; a weights-only folder runs token ids; `tokenizer=` takes the tokenizer from elsewhere."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import dask
import numpy as np
import pandas as pd
import pytest
import torch

import batchllm_dask  # noqa: F401 - registers the accessors
from batchllm_dask.caches import EngineSpec, get_tokenizer
from batchllm_dask.engine import Engine, EngineConfig, SamplingParams
from batchllm_dask.engine.default_model import build_tiny_checkpoint
from batchllm_dask.engine.files import check_model, check_visible_model, expected_shapes, read_safetensors_header
from batchllm_dask.engine.loader import load_tokenizer
from batchllm_dask.engine.model import CausalLM
from batchllm_dask.engine.model_args import ModelArgs
from _helpers import to_dask

ENGINE = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 16 << 20}
GREEDY = SamplingParams(max_tokens=5, temperature=0.0)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _truncate(file: Path, keep: int | None = None) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2 if keep is None else keep])


def _weights_only(src: Path, dst: Path) -> Path:
    """What `model.save_pretrained` writes: config, generation config and weights, no tokenizer files."""
    _copy(src, dst)
    for name in TOKENIZER_FILES:
        (dst / name).unlink(missing_ok=True)
    return dst


# Each broken kind: how to break a copy of the tiny checkpoint -> (error type, words the message must hold).
# "{dir}" stands for the broken folder; every message names the file (or folder) at fault.
BROKEN = {
    "missing-directory": (lambda p: shutil.rmtree(p), FileNotFoundError, ["{dir}", "does not exist"]),
    "missing-config": (lambda p: (p / "config.json").unlink(), FileNotFoundError,
                       ["no config.json in model directory {dir}", "model.safetensors"]),
    "config-not-json": (lambda p: (p / "config.json").write_text("{not json"), ValueError,
                        ["{dir}/config.json", "not valid JSON"]),
    "unsupported-architecture": (lambda p: _edit_config(p, model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                                 ValueError, ["{dir}/config.json", "GPT2LMHeadModel", "llama, mistral, qwen2"]),
    "config-field-missing": (lambda p: _drop_field(p, "hidden_size"),
                             ValueError, ["{dir}/config.json", "'hidden_size' is missing"]),
    "no-weights": (lambda p: (p / "model.safetensors").unlink(), FileNotFoundError,
                   ["no *.safetensors weights in {dir}"]),
    "truncated-weights": (lambda p: _truncate(p / "model.safetensors"), ValueError,
                          ["{dir}/model.safetensors", "truncated safetensors file", "incomplete download"]),
    "truncated-header": (lambda p: _truncate(p / "model.safetensors", keep=100), ValueError,
                         ["{dir}/model.safetensors", "truncated"]),
    "empty-weights-file": (lambda p: _truncate(p / "model.safetensors", keep=3), ValueError,
                           ["{dir}/model.safetensors", "not a safetensors file, or truncated"]),
    "config-of-more-layers": (lambda p: _edit_config(p, num_hidden_layers=3), ValueError,
                              ["{dir}", "lack", "config.json implies", "3 layers", "model.layers.2."]),
    "config-of-fewer-layers": (lambda p: _edit_config(p, num_hidden_layers=1), ValueError,
                               ["{dir}", "does not have", "model.layers.1."]),
    "shape-mismatch": (lambda p: _edit_config(p, intermediate_size=96), ValueError,
                       ["{dir}/model.safetensors", "mlp.gate_proj.weight", "has shape", "implies", "96"]),
    "bias-the-config-lacks": (lambda p: _edit_config(p, model_type="llama", architectures=["LlamaForCausalLM"]),
                              ValueError, ["{dir}", "does not have", "q_proj.bias"]),
}


def _drop_field(path: Path, name: str) -> None:
    cfg = json.loads((path / "config.json").read_text())
    del cfg[name]
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_broken_checkpoint_is_refused_naming_the_file_and_the_problem(kind, tiny_llama_dir, tiny_qwen_dir,
                                                                        tmp_path):
    """check_model and Engine construction (the loader) raise the same clear error for each broken kind."""
    source = tiny_qwen_dir if kind == "bias-the-config-lacks" else tiny_llama_dir
    path = _copy(source, tmp_path / "ck")
    check_model(path)  # whole, it passes
    breaks, error, words = BROKEN[kind]
    breaks(path)
    for attempt in (lambda: check_model(path), lambda: Engine(path, **ENGINE)):
        with pytest.raises(error) as info:
            attempt()
        for word in words:
            assert word.format(dir=path) in str(info.value), (kind, str(info.value))


def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "sharded", sharded=True)
    shards = sorted(path.glob("*.safetensors"))
    assert len(shards) > 1 and check_model(path).weight_files == tuple(shards)
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=f"model.safetensors.index.json names shard files that are missing: "
                                                f".*{shards[1].name}"):
        check_model(path)
    with pytest.raises(FileNotFoundError, match=shards[1].name):
        Engine(path, **ENGINE)


def test_an_index_placing_a_tensor_in_the_wrong_shard_is_refused(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "sharded", sharded=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    index["weight_map"][name] = shards[1]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"places tensor '{name}' in {shards[1]}, which does not hold it"):
        check_model(path)


def test_a_gguf_path_that_is_not_gguf_and_a_plain_file_are_refused(tiny_llama_dir, tmp_path):
    fake = tmp_path / "model.Q4_K_M.gguf"
    fake.write_bytes(b"<html>404 Not Found</html>")
    for attempt in (lambda: check_model(fake), lambda: Engine(fake, **ENGINE)):
        with pytest.raises(ValueError, match=f"{fake}: not a GGUF file"):
            attempt()
    folder = tmp_path / "folder-with-gguf"
    folder.mkdir()
    shutil.copy(fake, folder / fake.name)
    with pytest.raises(ValueError, match="not a GGUF file"):
        check_model(folder)
    plain = tmp_path / "weights.bin"
    plain.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match=f"{plain} is a file, but a model is a checkpoint folder"):
        check_model(plain)


def test_the_tokenizer_option_must_name_a_tokenizer(tiny_llama_dir, tmp_path):
    weights = _weights_only(tiny_llama_dir, tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match=f"tokenizer: {tmp_path / 'nowhere'} does not exist"):
        check_model(tiny_llama_dir, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"tokenizer: {weights} lacks the tokenizer files"):
        Engine(tiny_llama_dir, tokenizer=str(weights), **ENGINE)
    for bad in (5, "", ["a"]):
        with pytest.raises(ValueError, match="tokenizer: must be a path"):
            EngineConfig(tokenizer=bad)
    assert EngineConfig(tokenizer=Path("/x")).tokenizer == "/x"


def test_safetensors_header_and_expected_shapes_agree_with_the_model(tiny_llama_dir, tiny_qwen_dir):
    """The torch-free shapes are the model's own state dict (lm_head absent when tied), and the header
    read by hand is safetensors' own view of the file."""
    from safetensors import safe_open
    for path in (tiny_llama_dir, tiny_qwen_dir):
        args = ModelArgs.from_hf_config(json.loads((path / "config.json").read_text()))
        with torch.device("meta"):
            model = CausalLM(args)
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if args.tie_word_embeddings:
            del want["lm_head.weight"]
        assert expected_shapes(args) == want
        header = read_safetensors_header(path / "model.safetensors")
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            assert {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()} == {n: e.shape for n, e in header.items()}


# ------------------------------------------------------------------------------------- on the client

def _no_compute(*args, **kwargs):
    raise AssertionError("a task ran: the checkpoint must be refused when the job is built")


@pytest.mark.parametrize("kind", ["truncated-weights", "unsupported-architecture", "shape-mismatch"])
def test_generate_on_a_broken_checkpoint_raises_on_the_client_before_any_task(kind, tiny_llama_dir, tmp_path):
    path = _copy(tiny_llama_dir, tmp_path / "ck")
    breaks, error, words = BROKEN[kind]
    breaks(path)
    df = pd.DataFrame({"prompt": ["a b c", "d e f", "g h i", "j k l"]})
    with dask.config.set(scheduler=_no_compute):
        for npartitions in (1, 2):
            with pytest.raises(error, match=words[1]):
                to_dask(df, 2).llm.generate("prompt", str(path), npartitions=npartitions, **ENGINE)
        with pytest.raises(error, match=words[1]):
            to_dask(df, 2).llm.plan("prompt", str(path), npartitions=2)
        with pytest.raises(error, match=words[1]):
            df.llm.generate("prompt", str(path), **ENGINE)


def test_a_path_the_client_does_not_see_is_left_to_the_workers(tmp_path):
    """A cluster's workers may see paths the client does not: the job is built, nothing raised."""
    missing = str(tmp_path / "on-the-workers-only")
    assert check_visible_model(missing) is None
    df = pd.DataFrame({"prompt": ["a", "b"]})
    with dask.config.set(scheduler=_no_compute):  # one unbounded partition: nothing is planned when it is built
        to_dask(df, 2).llm.generate("prompt", missing, npartitions=1, partition_tokens=None, **ENGINE)
    # Otherwise the plan is computed when the job is built (tokenizing only, where the input lives: on a
    # cluster, the workers); here the client tokenizes and, without the files, the rows carry the error.
    with dask.config.set(scheduler="sync"):
        out = to_dask(df, 2).llm.generate("prompt", missing, npartitions=2, **ENGINE)
    assert out.npartitions == 2


# ------------------------------------------------------------------------------------- weights only

@pytest.fixture(scope="module")
def weights_only(tiny_llama_dir, tmp_path_factory) -> Path:
    return _weights_only(tiny_llama_dir, tmp_path_factory.mktemp("weights-only") / "ck")


@pytest.fixture(scope="module")
def full_engine(tiny_llama_dir) -> Engine:
    return Engine(tiny_llama_dir, **ENGINE)


ID_PROMPTS = [[1, 40, 41, 42, 43, 44, 45, 46], [1, 40, 41, 42, 43, 90], [1, 200, 17]]


def test_a_weights_only_checkpoint_runs_token_ids_and_fails_text_rows_alone(weights_only, full_engine):
    """Token-id prompts give the full checkpoint's tokens (text None: nothing to decode with); a text row, and
    an id row with stop strings, fail alone with an error naming the folder and the tokenizer files."""
    assert check_model(weights_only).tokenizer_dir is None
    with pytest.raises(FileNotFoundError, match=f"{weights_only} lacks the tokenizer files .*tokenizer.json"):
        load_tokenizer(weights_only)
    engine = Engine(weights_only, **ENGINE)
    want = full_engine.generate(ID_PROMPTS, GREEDY)
    prompts = [ID_PROMPTS[0], "a text prompt", ID_PROMPTS[1], ID_PROMPTS[2], ID_PROMPTS[0]]
    params = [GREEDY] * 4 + [SamplingParams(max_tokens=5, temperature=0.0, stop=["x"])]
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in (outs[0], outs[2], outs[3])] == [w.token_ids for w in want]
    assert all(o.text is None and o.finish_reason == "length" and o.error is None for o in (outs[0], outs[2], outs[3]))
    for out, need in ((outs[1], "a text prompt"), (outs[4], "stop strings")):
        assert out.finish_reason == "error"
        assert f"{need} needs a tokenizer" in out.error and str(weights_only) in out.error
        assert "tokenizer.json" in out.error and "tokenizer=" in out.error


def test_the_tokenizer_option_loads_the_tokenizer_from_elsewhere(weights_only, tiny_llama_dir, full_engine):
    engine = Engine(weights_only, tokenizer=str(tiny_llama_dir), **ENGINE)
    prompts = ["The river and the stone", "green data frame"]
    got, want = engine.generate(prompts, GREEDY), full_engine.generate(prompts, GREEDY)
    assert [(o.token_ids, o.text) for o in got] == [(o.token_ids, o.text) for o in want]
    assert all(o.finish_reason == "length" and o.text is not None for o in got)


def test_the_tokenizer_source_of_a_spec_and_the_tokenizer_cache(weights_only, tiny_llama_dir):
    plain = EngineSpec.make(str(weights_only), {})
    other = EngineSpec.make(str(weights_only), {"tokenizer": str(tiny_llama_dir)})
    assert plain.tokenizer is None and plain.tokenizer_source == str(weights_only.resolve())
    assert other.tokenizer_source == str(tiny_llama_dir.resolve())
    tokenizer, _ = get_tokenizer(other.tokenizer_source)
    assert get_tokenizer(other.tokenizer_source)[0] is tokenizer  # cached by that path
    with pytest.raises(FileNotFoundError, match=f"{weights_only} lacks the tokenizer files"):
        get_tokenizer(plain.tokenizer_source)


def _mixed_frame() -> pd.DataFrame:
    prompts = [ID_PROMPTS[0], "text needs a tokenizer", ID_PROMPTS[1], "more text", ID_PROMPTS[2], ID_PROMPTS[1]]
    df = pd.DataFrame({"prompt": pd.Series(prompts, dtype=object)})
    df.index = pd.Index([f"r{i}" for i in range(len(df))], name="rid")
    return df


@pytest.mark.parametrize("npartitions", [None, 1, 2])
def test_dataframe_generate_on_a_weights_only_checkpoint(npartitions, weights_only, tiny_llama_dir, full_engine):
    """pandas (None), one Dask partition and the planned shuffle: the id rows complete with the full checkpoint's
    token counts, the text rows fail alone naming the folder; with tokenizer= every row completes as on the full
    checkpoint."""
    df = _mixed_frame()
    text_rows = [isinstance(p, str) for p in df["prompt"]]

    def run(**options):
        if npartitions is None:
            return df.llm.generate("prompt", str(weights_only), max_tokens=5, temperature=0.0, **ENGINE, **options)
        out = to_dask(df, 2).llm.generate("prompt", str(weights_only), npartitions=npartitions, max_tokens=5,
                                          temperature=0.0, **ENGINE, **options)
        return out.compute(scheduler="sync").loc[df.index]

    out = run()
    assert (out["finish_reason"] == np.where(text_rows, "error", "length")).all()
    assert (out.loc[~np.array(text_rows), "completion_tokens"] == 5).all()
    for error in out.loc[text_rows, "error"]:
        assert str(weights_only.resolve()) in error and "lacks the tokenizer files" in error
    out = run(tokenizer=str(tiny_llama_dir))
    want = full_engine.generate(df["prompt"].tolist(), GREEDY)
    assert out["completion"].tolist() == [w.text for w in want]
    assert (out["finish_reason"] == "length").all()
