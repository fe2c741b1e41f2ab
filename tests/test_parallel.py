"""Tensor parallel on the CPU: 2 gloo ranks give the greedy tokens of one rank, token for token."""
from __future__ import annotations

import os

import pytest
import torch

from batchllm_dask.engine import Engine, SamplingParams
from batchllm_dask.engine.default_model import build_tiny_checkpoint
from batchllm_dask.engine.model import ModelArgs
from batchllm_dask.engine.parallel import MULTICAST_OFF, check_shardable, local_args, shard_of

PROMPTS = ["The quick brown fox", "The quick brown fox jumps over", "hello world, this is a test",
           list(range(3, 40)), "a" * 50]


@pytest.fixture(scope="module", params=[2, 1], ids=["kv_heads_2", "kv_heads_1_replicated"])
def checkpoint(request, tmp_path_factory):
    """A tiny Llama with 4 query heads and `param` KV heads (qkv biases too: the shards must carry them)."""
    path = tmp_path_factory.mktemp(f"tp_kv{request.param}")
    return build_tiny_checkpoint(path, "llama", seed=3, num_key_value_heads=request.param, attention_bias=True,
                                 mlp_bias=True, num_hidden_layers=2)


def _tokens(engine: Engine) -> list[list[int]]:
    sampling = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                SamplingParams(max_tokens=7, temperature=0.8, seed=5, ignore_eos=True)]
    outs = engine.generate(PROMPTS, [sampling[i % 2] for i in range(len(PROMPTS))])
    return [o.token_ids for o in outs]


def test_two_gloo_ranks_equal_one_rank(checkpoint):
    single = Engine(checkpoint, dtype="float32", device="cpu", kv_cache_bytes=8 << 20)
    expected = _tokens(single)
    engine = Engine(checkpoint, dtype="float32", device="cpu", kv_cache_bytes=8 << 20, tensor_parallel_size=2)
    try:
        assert engine.args.num_heads == single.args.num_heads // 2
        assert engine.args.num_kv_heads == max(1, single.args.num_kv_heads // 2)
        assert engine.num_kv_pages >= single.num_kv_pages  # a rank's pages hold fewer KV heads
        assert _tokens(engine) == expected
        assert _tokens(engine) == expected  # a second call on the same group
        children = engine._ranks.children
    finally:
        engine.close()
    assert all(child.poll() is not None for child in children)
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(["again"])
    assert not torch.distributed.is_initialized()


def test_shards_cover_every_head_once():
    args = ModelArgs(vocab_size=8, hidden_size=64, intermediate_size=96, num_layers=1, num_heads=8, num_kv_heads=2,
                     head_dim=8, max_position_embeddings=16)
    shards = [shard_of(args, r, 4) for r in range(4)]
    assert [(s.q0, s.q1) for s in shards] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [(s.kv0, s.kv1) for s in shards] == [(0, 1), (0, 1), (1, 2), (1, 2)]  # 2 KV heads replicated on 4 ranks
    assert [(s.i0, s.i1) for s in shards] == [(0, 24), (24, 48), (48, 72), (72, 96)]
    for s in shards:  # each rank's query heads read the KV head it holds
        assert all(q // (args.num_heads // args.num_kv_heads) == s.kv0 for q in range(s.q0, s.q1))
    assert local_args(args, 4).num_heads == 2 and local_args(args, 4).num_kv_heads == 1


@pytest.mark.parametrize("heads, kv, inter, size, word", [(6, 2, 64, 4, "num_attention_heads"),
                                                          (8, 3, 64, 2, "num_key_value_heads"),
                                                          (8, 8, 30, 4, "intermediate_size")])
def test_unshardable_models_are_refused(heads, kv, inter, size, word):
    with pytest.raises(ValueError, match=word):
        check_shardable(heads, kv, inter, size)


def test_multicast_stays_off_in_rank_processes(monkeypatch):
    from batchllm_dask.engine.rank_processes import _child_env
    monkeypatch.delenv("NCCL_NVLS_ENABLE", raising=False)
    env = _child_env()
    assert all(env[k] == v for k, v in MULTICAST_OFF.items())
    assert os.environ.get("NCCL_NVLS_ENABLE") is None  # the caller's own environment is not rewritten here


def test_a_dask_worker_owns_a_tensor_parallel_group(tiny_llama_dir):
    """One worker declaring GPU=2 runs a tensor_parallel_size=2 engine (its rank 1 a subprocess of the daemonic
    worker process); tasks ask for GPU=2 through gpu_resources(gpus=2); the completions are one rank's."""
    import pandas as pd
    distributed = pytest.importorskip("distributed")
    import batchllm_dask
    from _helpers import to_dask
    options = dict(max_tokens=5, temperature=0.0, dtype="float32", device="cpu", kv_cache_bytes=8 << 20)
    df = pd.DataFrame({"prompt": [p for p in PROMPTS if isinstance(p, str)]})
    expected = df.llm.generate("prompt", str(tiny_llama_dir), **options)["completion"]
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, resources={"GPU": 2},
                                  dashboard_address=None) as cluster, distributed.Client(cluster):
        out = to_dask(df, 2).llm.generate("prompt", str(tiny_llama_dir), npartitions=1, tensor_parallel_size=2,
                                          **options)
        with pytest.raises(ValueError, match="gpus=3"), batchllm_dask.gpu_resources(gpus=3):
            pass
        with batchllm_dask.gpu_resources(gpus=2) as applied:
            result = out.compute()
    assert applied
    assert result["completion"].sort_index().tolist() == expected.tolist()


def test_an_engine_that_cannot_shard_raises_before_starting_ranks(tiny_llama_dir, monkeypatch):
    import subprocess
    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a))
    with pytest.raises(ValueError, match="tensor_parallel_size=3: num_attention_heads=4"):
        Engine(tiny_llama_dir, dtype="float32", device="cpu", tensor_parallel_size=3)
    assert not started and not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        Engine(tiny_llama_dir, dtype="float32", device="cpu", tensor_parallel_size=0)
