"""CUDA graphs for steps with prefill chunks (engine/mixed_graphs.py) and the scheduler's step sizes.

On the CPU: the bucket sizes, `fit_step_size` (the scheduler shortens a step's last prefill chunks to a
graph's token count, moving the rest to the next step), and the whole static path of the engine with
`run_eagerly` in place of a capture (mixed steps through the static buffers, padded rows and fixed-grid
split plans give the eager engine's greedy tokens).  Marked `gpu`: real graphs against the eager engine.
"""
import random

import pytest
import torch
from _helpers import kernel_device
from test_cuda_graphs import STATIC_OPTIONS, _prompts

from batchllm_dask.engine import Engine, SamplingParams
from batchllm_dask.engine import cuda_graphs as cg
from batchllm_dask.engine.config import EngineConfig
from batchllm_dask.engine.default_model import DEFAULT_MODEL_OVERRIDES, build_tiny_checkpoint
from batchllm_dask.engine.mixed_graphs import MixedGraphs, mixed_bucket_sizes
from batchllm_dask.engine.scheduler import Chunk, fit_step_size

INTERPRET = kernel_device() == "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# ---- sizes (pure) ----

def test_mixed_bucket_sizes_are_fine_below_1024_and_capped():
    sizes = mixed_bucket_sizes(4096)
    assert sizes[:3] == (64, 128, 192) and sizes[-1] == 4096 and list(sizes) == sorted(set(sizes))
    gaps = [b - a for a, b in zip(sizes, sizes[1:])]
    assert max(gaps[:15]) == 64 and max(gaps) == 256
    assert mixed_bucket_sizes(1000)[-1] == 960 and mixed_bucket_sizes(63) == ()
    with pytest.raises(ValueError, match="cuda_graph_max_tokens"):
        EngineConfig(cuda_graph_max_tokens=-1)


def _chunks(lengths: list[int]) -> list[Chunk]:
    return [Chunk(f"seq{i}", 0, n) for i, n in enumerate(lengths)]  # fit_step_size reads lengths only


def test_fit_step_size_cuts_the_last_chunks_to_a_size():
    sizes = (16, 32, 48, 64)
    fitted = fit_step_size(_chunks([8, 4, 3]), 20, sizes)  # 35 tokens -> 32 (cutting 3 costs less than 13 of padding)
    assert 20 + sum(c.length for c in fitted) == 32
    assert [c.length for c in fitted] == [8, 3, 1]  # the last ones first, each keeps a token
    assert all(c.start == 0 for c in fitted)


@pytest.mark.parametrize("decodes,lengths,sizes", [
    (20, [12], (16, 32, 48)),  # a size already
    (70, [5], (16, 32, 48, 64)),  # above the largest
    (0, [], (16, 32)),  # no chunks
    (20, [10, 9, 3], (16, 32, 48, 64)),  # 42: cutting 10 costs more than padding 6
    (30, [5], (16, 32, 48, 64)),  # 35 -> 32 would cut 3 of the 4 cuttable tokens: most of the chunk
    (511, [64], (512, 576)),  # a short prompt beside 511 decodes: padded by 1, not trickled in a token a step
    (500, [30], (512, 576)),  # cutting 18 of 29 cuttable tokens: most of the chunk would move
    (20, [15], (16, 48)),  # the size below (16) is under the decodes (20)
])
def test_fit_step_size_leaves_steps_it_cannot_or_should_not_cut(decodes, lengths, sizes):
    chunks = _chunks(lengths)
    assert fit_step_size(chunks, decodes, sizes) == chunks


def test_fit_step_size_random_steps_land_on_a_size_or_stay():
    rng = random.Random(0)
    sizes = tuple(range(8, 257, 8))
    for _ in range(500):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 6))]
        decodes = rng.randint(0, 100)
        fitted = fit_step_size(_chunks(lengths), decodes, sizes)
        total = decodes + sum(c.length for c in fitted)
        assert len(fitted) == len(lengths) and all(1 <= c.length <= n for c, n in zip(fitted, lengths))
        if [c.length for c in fitted] != lengths:
            assert total in sizes and total > decodes


# ---- the engine's static path (CPU) ----

def _attach_mixed(engine: Engine, sizes: tuple[int, ...]) -> MixedGraphs:
    runner = engine.runner
    runner.graphs = cg.DecodeGraphs(runner.model, runner.k_cache, runner.v_cache, runner.scratch_page, 512,
                                    "triton", capture=cg.run_eagerly)
    runner.mixed_graphs = MixedGraphs(runner.model, runner.k_cache, runner.v_cache, runner.scratch_page,
                                      sizes[-1], "triton", capture=cg.run_eagerly, sizes=sizes)
    runner.step_sizes = sizes
    return runner.mixed_graphs


def _eager_tokens(path, sizes: tuple[int, ...]) -> list[list[int]]:
    """The eager engine's greedy tokens, its scheduler aiming at `sizes` (() : the budget's cuts alone)."""
    prompts, params = _prompts(12, seed=5)
    engine = Engine(path, attention_backend="triton", **STATIC_OPTIONS)
    engine.runner.step_sizes = sizes
    return [o.token_ids for o in engine.generate(prompts, params)]


SIZES = (16, 24, 32, 48, 64)  # the budget is 96: steps of 65 to 96 tokens run eagerly


@pytest.fixture(scope="module")
def sized_tokens(tiny_llama_dir):
    return _eager_tokens(tiny_llama_dir, SIZES)


@pytest.mark.skipif(not INTERPRET, reason="the GPU test below captures real graphs")
def test_step_sizes_keep_the_tokens(tiny_llama_dir, sized_tokens):
    """Steps cut to the sizes compute the same tokens as steps cut by the budget alone (fp32)."""
    assert sized_tokens == _eager_tokens(tiny_llama_dir, ())


@pytest.mark.skipif(not INTERPRET, reason="the GPU test below captures real graphs")
def test_static_path_of_mixed_steps_gives_the_eager_tokens(tiny_llama_dir, sized_tokens):
    """Steps with prefill chunks through the static buffers (padded rows, fixed-grid split plans, the LM head
    on the sampled rows after the replay) give the eager engine's greedy tokens for the same steps; steps
    above the largest size run eagerly."""
    prompts, params = _prompts(12, seed=5)
    engine = Engine(tiny_llama_dir, attention_backend="triton", **STATIC_OPTIONS)
    mixed = _attach_mixed(engine, SIZES)
    outs = engine.generate(prompts, params)
    assert [o.token_ids for o in outs] == sized_tokens
    assert mixed.replays > 0 and mixed.captures >= 1
    assert all(key[0] in SIZES for key in mixed.graphs)
    assert mixed.replays + engine.runner.graphs.replays < engine.last_stats.steps  # the larger steps: eager


# ---- GPU: real graphs ----

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_mixed_graphs_give_the_eager_tokens(dtype, tmp_path):
    """Greedy tokens with mixed-step graphs (and the step sizes they bring) equal those without, on the tiny
    default-shape model with shared prefixes and chunked prefill, over two calls; fp32 exactly, bf16 with
    every mismatch a near-tie (as test_cuda_graphs)."""
    from test_engine import _divergence, _near_tie, _system_document_question
    path = build_tiny_checkpoint(tmp_path / "llama", arch="llama", **DEFAULT_MODEL_OVERRIDES)
    prompts, max_tokens = _system_document_question(seed=11)
    params = [SamplingParams(max_tokens=m, temperature=0.0) for m in max_tokens]
    options = dict(dtype=dtype, device="cuda", min_shared_tokens=1, kv_cache_bytes=1 << 28,
                   max_num_batched_tokens=512)
    eager = Engine(path, cuda_graph_max_tokens=0, **options)
    graphed = Engine(path, **options)
    mixed = graphed.runner.mixed_graphs
    assert eager.runner.mixed_graphs is None and mixed is not None
    mismatches = []
    for call in range(2):
        want = [o.token_ids for o in eager.generate(prompts, params)]
        got = [o.token_ids for o in graphed.generate(prompts, params)]
        mismatches += [(call, i, _divergence(g, w), g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]
    print(f"\nGPU mixed graphs {dtype}: {mixed.replays} replays, {mixed.captures} captures, {mixed.eager_steps} "
          f"eager; {2 * len(prompts) - len(mismatches)}/{2 * len(prompts)} completions identical")
    assert mixed.replays > 0
    if dtype == "float32":
        assert not mismatches, mismatches[:3]
        return
    from transformers import AutoModelForCausalLM
    bf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    fp32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    ties = [_near_tie(fp32, bf16, graphed.tokenizer.encode(prompts[i]) + w[:j], g[j], w[j])
            for call, i, j, g, w in mismatches]
    print(f"GPU mixed graphs bf16 mismatches (near-tie, fp32 logit gap, bf16 logit error): {ties}")
    assert all(tie for tie, _, _ in ties), "every bf16 mismatch is a near-tie"


def test_forced_runs_cut_to_step_sizes_give_the_tokens_of_token_by_token_decoding(tiny_llama_dir):
    """Jump-forward's forced runs are chunks beside decodes, the steps mixed graphs take: cut to the step sizes
    (over several steps), they still give the tokens of token-by-token decoding, valid, in fewer steps."""
    from _helpers import SCHEMA, assert_valid
    from test_jump_forward import ENGINE, LONG_KEY, prompts
    jumping, stepping = Engine(tiny_llama_dir, **ENGINE), Engine(tiny_llama_dir, **ENGINE, jump_forward=False)
    jumping.runner.step_sizes = (8, 12, 16, 24, 32)
    for schema in (SCHEMA, LONG_KEY):
        params = SamplingParams(max_tokens=120, temperature=0.0, json_schema=schema)
        fast, slow = jumping.generate(prompts(6), params), stepping.generate(prompts(6), params)
        assert [o.token_ids for o in fast] == [o.token_ids for o in slow]
        for out in fast:
            assert_valid(out.text, params)
        assert jumping.last_stats.steps < stepping.last_stats.steps
