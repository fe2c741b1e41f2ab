"""The fused layer ops (kernels/fused_ops.py) against their torch references, and the model's fused path.

On the CPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)
in fp32 and fp16 at ragged small shapes; tests marked `gpu` run real sizes in bf16
against float32 references.  Every test draws fresh random inputs (the seed is in
the failure message) and every output the ops allocate is poisoned with NaN first.
"""
from __future__ import annotations

import random

import pytest
from _helpers import kernel_device
import torch

from batchllm_dask.engine.batch import ForwardBatch
from batchllm_dask.engine.loader import load_checkpoint, load_tokenizer
from batchllm_dask.engine.model import CausalLM
from batchllm_dask.kernels import AttentionWork, fused_ops
from batchllm_dask.kernels.fused_ops import rms_norm, rope_and_store_kv, silu_and_mul
from batchllm_dask.kernels.reference import rms_norm_reference, rope_and_store_kv_reference, silu_and_mul_reference

DEVICE = kernel_device()
INTERPRET = DEVICE == "cpu"
pytestmark = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# Same-dtype references round where the kernels round: only an rsqrt's or an exp's last bit may differ.
SAME_DTYPE_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=2e-3)}
BF16_TOL = dict(atol=2e-2, rtol=2e-2)  # bf16 kernels against float32 references


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    monkeypatch.setattr(fused_ops, "_empty",
                        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device))


@pytest.fixture
def rand():
    """randn(*shape, dtype) from a fresh seed, made on the CPU then moved; the seed goes in messages."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape, dtype=torch.float32, device=DEVICE, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)
    draw.seed = seed
    return draw


# ------------------------------------------------------------------------------------------------ rms_norm

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,cols", [(1, 64), (7, 96), (19, 200)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(rand, dtype, rows, cols, with_residual):
    x, weight = rand(rows, cols, dtype=dtype), rand(cols, dtype=dtype, scale=0.1) + 1
    residual = rand(rows, cols, dtype=dtype) if with_residual else None
    out, new_residual = rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_residual = rms_norm_reference(x, weight, 1e-5, residual)
    assert not out.isnan().any(), f"unwritten rows (seed {rand.seed})"
    torch.testing.assert_close(out, ref_out, **SAME_DTYPE_TOL[dtype], msg=lambda m: f"seed {rand.seed}: {m}")
    assert torch.equal(new_residual, ref_residual), f"x + residual differs (seed {rand.seed})"
    if not with_residual:
        assert new_residual is x


def test_rms_norm_strided_rows(rand):
    """Rows picked out of a wider buffer (a stride larger than the row) are read correctly."""
    wide = rand(9, 160)
    x, residual, weight = wide[:, :96], rand(9, 96), rand(96)
    out, new_residual = rms_norm(x, weight, 1e-6, residual)
    ref_out, ref_residual = rms_norm_reference(x, weight, 1e-6, residual)
    torch.testing.assert_close(out, ref_out, **SAME_DTYPE_TOL[torch.float32])
    assert torch.equal(new_residual, ref_residual)


# --------------------------------------------------------------------------------------- rope_and_store_kv

def rope_case(rand, tokens, num_heads, num_kv_heads, head_dim, dtype, page_size=4, fused_qkv=False):
    """Inputs of one call; q, k, v are views of one [T, (Hq + 2 Hkv) * D] buffer when fused_qkv."""
    sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
    if fused_qkv:
        q, k, v = rand(tokens, sum(sizes), dtype=dtype).split(sizes, dim=-1)
    else:
        q, k, v = (rand(tokens, n, dtype=dtype) for n in sizes)
    q, k, v = q.view(tokens, num_heads, head_dim), k.view(tokens, num_kv_heads, -1), v.view(tokens, num_kv_heads, -1)
    positions = torch.randint(0, 4096, (tokens,))
    freqs = positions[:, None].float() * (1e4 ** (-torch.arange(0, head_dim, 2).float() / head_dim))[None, :]
    cos, sin = freqs.cos().to(DEVICE), freqs.sin().to(DEVICE)  # float32 tables, as the model gathers them
    num_pages = -(-tokens // page_size) + 3
    cache_shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=DEVICE)
    slots = torch.randperm(num_pages * page_size)[:tokens].to(DEVICE)  # scattered, some slots left unwritten
    return q, k, v, cos, sin, k_cache, k_cache.clone(), slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,num_heads,num_kv_heads,head_dim",
                         [(1, 4, 4, 16), (5, 6, 2, 64), (19, 8, 1, 128), (7, 3, 1, 80)])
@pytest.mark.parametrize("in_place", [False, True])
def test_rope_and_store_kv(rand, dtype, tokens, num_heads, num_kv_heads, head_dim, in_place):
    q, k, v, cos, sin, k_cache, v_cache, slots = rope_case(rand, tokens, num_heads, num_kv_heads, head_dim, dtype,
                                                           fused_qkv=in_place)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_q = rope_and_store_kv_reference(q, k, v, cos, sin, ref_k, ref_v, slots)
    out = rope_and_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots, out=q if in_place else None)
    if in_place:
        assert out is q
    # Products of two fp16 numbers are exact in fp32 and each op rounds like eager torch: bit-equal.
    assert torch.equal(out, ref_q), f"rotated q differs (seed {rand.seed})"
    assert torch.equal(k_cache.nan_to_num(7.0), ref_k.nan_to_num(7.0)), f"k cache differs (seed {rand.seed})"
    assert torch.equal(v_cache.nan_to_num(7.0), ref_v.nan_to_num(7.0)), f"v cache differs (seed {rand.seed})"
    assert k_cache.isnan().any(), "slots outside slot_mapping must stay untouched"


# -------------------------------------------------------------------------------------------- silu_and_mul

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens,inter", [(1, 64), (6, 100), (13, 1500)])
def test_silu_and_mul(rand, dtype, tokens, inter):
    gate_up = rand(tokens, 2 * inter, dtype=dtype, scale=3.0)
    out = silu_and_mul(gate_up)
    assert out.shape == (tokens, inter) and not out.isnan().any(), f"unwritten output (seed {rand.seed})"
    torch.testing.assert_close(out, silu_and_mul_reference(gate_up), **SAME_DTYPE_TOL[dtype],
                               msg=lambda m: f"seed {rand.seed}: {m}")


def test_empty_batches():
    x = torch.zeros(0, 64, device=DEVICE)
    assert rms_norm(x, torch.ones(64, device=DEVICE), 1e-6, x)[0].shape == (0, 64)
    assert silu_and_mul(torch.zeros(0, 128, device=DEVICE)).shape == (0, 64)


# ----------------------------------------------------------------------------------- the model's fused path

def run_chunks(model, args, ids, dtype, cuts, backend="torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a prefill in chunks [0, cuts...) then the rest over a paged cache; and the k cache after."""
    page_size, num_pages = 4, 16
    shape = (args.num_layers, num_pages, page_size, args.num_kv_heads, args.head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    pages = list(range(num_pages - 1, -1, -1))
    bounds, logits = [0, *cuts, len(ids)], []
    as_t = lambda x: torch.as_tensor(list(x), device=DEVICE)  # noqa: E731
    with torch.no_grad():
        for start, end in zip(bounds, bounds[1:]):
            work = AttentionWork.from_lists([0], [end - start], [end], [1], [pages], DEVICE)
            slots = [pages[p // page_size] * page_size + p % page_size for p in range(start, end)]
            batch = ForwardBatch(as_t(ids[start:end]), as_t(range(start, end)), as_t(slots), work,
                                 as_t(range(end - start)))
            logits.append(model.compute_logits(model(batch, k_cache, v_cache, backend)))
    return torch.cat(logits), k_cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("arch", ["llama", "qwen"])
def test_model_fused_path_equals_torch_path(tiny_llama_dir, tiny_qwen_dir, dtype, arch):
    path = tiny_llama_dir if arch == "llama" else tiny_qwen_dir
    model, args = load_checkpoint(path, dtype, DEVICE)
    ids = load_tokenizer(path)("The quick brown fox jumps over the lazy dog").input_ids
    cuts = (len(ids) - 3, len(ids) - 2, len(ids) - 1)  # a prefill, then three decode steps
    model.fused = False
    plain, plain_k = run_chunks(model, args, ids, dtype, cuts)
    model.fused = True
    fused, fused_k = run_chunks(model, args, ids, dtype, cuts)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)  # fp16: an ulp
    torch.testing.assert_close(fused, plain, **tol)
    torch.testing.assert_close(fused_k, plain_k, equal_nan=True, **tol)


def test_model_fused_path_with_triton_attention(tiny_llama_dir):
    """The rotated q stays a strided view of the qkv buffer: the Triton attention reads it through its strides."""
    model, args = load_checkpoint(tiny_llama_dir, torch.float32, DEVICE)
    ids = load_tokenizer(tiny_llama_dir)("hello there, a short prompt").input_ids
    cuts = (len(ids) - 2, len(ids) - 1)
    model.fused = False
    plain, _ = run_chunks(model, args, ids, torch.float32, cuts)
    model.fused = True
    torch.testing.assert_close(run_chunks(model, args, ids, torch.float32, cuts, "triton")[0], plain,
                               atol=1e-4, rtol=1e-4)


def test_fuse_projections_keeps_memory(tiny_qwen_dir):
    model, _ = load_checkpoint(tiny_qwen_dir, torch.float32, "cpu")
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.is_fused and mlp.is_fused and attn.qkv_proj.bias is not None
    assert not hasattr(attn, "q_proj") and not hasattr(mlp, "gate_proj")
    names = set(model.state_dict())
    assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names
    assert not any(n.endswith((".q_proj.weight", ".v_proj.weight", ".gate_proj.weight", ".up_proj.weight"))
                   for n in names)
    with torch.device("meta"):
        unfused = CausalLM(model.args)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in unfused.parameters())
    assert model.fused is None and not model.use_fused(torch.zeros(1, dtype=torch.bfloat16))  # auto: CUDA only


# ------------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("rows,cols", [(1, 2048), (1037, 4096), (300, 3584)])
def test_gpu_rms_norm_bf16(rand, rows, cols):
    x, residual = rand(rows, cols, dtype=torch.bfloat16), rand(rows, cols, dtype=torch.bfloat16)
    weight = rand(cols, dtype=torch.bfloat16, scale=0.1) + 1
    out, new_residual = rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_residual = rms_norm_reference(x.float(), weight.float(), 1e-5, residual.float())
    torch.testing.assert_close(out.float(), ref_out, **BF16_TOL, msg=lambda m: f"seed {rand.seed}: {m}")
    torch.testing.assert_close(new_residual.float(), ref_residual, **BF16_TOL)
    assert torch.equal(new_residual, x + residual)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tokens,num_heads,num_kv_heads,head_dim", [(1, 32, 8, 64), (1037, 32, 8, 128),
                                                                    (513, 14, 2, 64), (77, 64, 8, 128)])
def test_gpu_rope_and_store_kv_bf16(rand, tokens, num_heads, num_kv_heads, head_dim):
    q, k, v, cos, sin, k_cache, v_cache, slots = rope_case(rand, tokens, num_heads, num_kv_heads, head_dim,
                                                           torch.bfloat16, page_size=16, fused_qkv=True)
    ref_k, ref_v = k_cache.float(), v_cache.float()
    # The kernel rounds the tables to bf16 as HF does, then rotates in float32: so does the reference.  (With the
    # float32 tables, the tables' rounding alone reached 0.021 in one element of 4.2 million, seed 114806815.)
    cos_bf16, sin_bf16 = cos.to(torch.bfloat16).float(), sin.to(torch.bfloat16).float()
    ref_q = rope_and_store_kv_reference(q.float(), k.float(), v.float(), cos_bf16, sin_bf16, ref_k, ref_v, slots)
    out = rope_and_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots, out=q)
    torch.testing.assert_close(out.float(), ref_q, **BF16_TOL, msg=lambda m: f"seed {rand.seed}: {m}")
    torch.testing.assert_close(k_cache.float(), ref_k, equal_nan=True, **BF16_TOL)
    torch.testing.assert_close(v_cache.float(), ref_v, equal_nan=True, **BF16_TOL)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tokens,inter", [(1, 8192), (1037, 14336), (64, 4864)])
def test_gpu_silu_and_mul_bf16(rand, tokens, inter):
    gate_up = rand(tokens, 2 * inter, dtype=torch.bfloat16, scale=3.0)
    torch.testing.assert_close(silu_and_mul(gate_up).float(), silu_and_mul_reference(gate_up.float()), **BF16_TOL,
                               msg=lambda m: f"seed {rand.seed}: {m}")


@pytest.mark.gpu
@cuda
def test_gpu_model_auto_fused_bf16(tiny_llama_dir):
    """bf16 on CUDA picks the fused path by itself; its logits agree with the forced torch path."""
    model, args = load_checkpoint(tiny_llama_dir, torch.bfloat16, "cuda")
    assert model.use_fused(torch.zeros(1, dtype=torch.bfloat16, device="cuda"))
    ids = load_tokenizer(tiny_llama_dir)("The quick brown fox jumps over the lazy dog").input_ids
    cuts = (len(ids) - 2, len(ids) - 1)
    fused, _ = run_chunks(model, args, ids, torch.bfloat16, cuts)
    model.fused = False
    plain, _ = run_chunks(model, args, ids, torch.bfloat16, cuts)
    torch.testing.assert_close(fused, plain, atol=1e-1, rtol=5e-2)  # a few bf16 ulps of logits near 6
