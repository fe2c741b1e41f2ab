"""The Triton attention kernels against the torch reference (kernels/reference.py).

On the CPU the kernels run in Triton's interpreter (small shapes); tests marked
`gpu` run at real sizes on CUDA.  Every test draws fresh random inputs (the seed
is in the failure message), poisons the output and the kernels' scratch with
NaN before the run, and compares row by row with the reference computed in
float32 from the same inputs.
"""

import torch

import random
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import pytest
from _helpers import kernel_device

from batchllm_dask.kernels import attention_plan as ap
from batchllm_dask.kernels import prefix_attention
from batchllm_dask.kernels.extend_attention import extend_attention
from batchllm_dask.kernels.prefix_attention import fused_paged_attention
from batchllm_dask.kernels.reference import AttentionWork, paged_attention_reference

DEVICE = kernel_device()
INTERPRET = DEVICE == "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # per-row relative error


# ---- batches: a tree of shared prefixes over requests, laid out in a paged pool ----

@dataclass
class Request:
    prefixes: list[int]  # shared-prefix ids, outermost first
    q_len: int  # 1 for a decode, the chunk length for a prefill chunk
    kv_len: int  # keys of its own segment (for a chunk: earlier chunks plus the chunk)


@dataclass
class Batch:
    prefix_len: dict[int, int] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)

    def work(self, page_size: int, num_pages: int, rng: random.Random, device) -> AttentionWork:
        """Items in a shuffled order, pages drawn at random from the pool (never shared by mistake)."""
        free = list(range(num_pages))
        rng.shuffle(free)
        take = lambda n: [free.pop() for _ in range(-(-n // page_size))]  # noqa: E731
        items, rows, row = [], {}, 0
        for r in self.requests:
            for p in r.prefixes:
                rows.setdefault(p, []).extend(range(row, row + r.q_len))
            items.append((row, r.q_len, r.kv_len, int(r.q_len > 1 or rng.random() < 0.5), take(r.kv_len)))
            row += r.q_len
        for p, p_rows in rows.items():
            assert p_rows == list(range(p_rows[0], p_rows[-1] + 1)), "a prefix's rows must be contiguous"
            items.append((p_rows[0], len(p_rows), self.prefix_len[p], 0, take(self.prefix_len[p])))
        rng.shuffle(items)
        return AttentionWork.from_lists(*map(list, zip(*items)), device=device)

    @property
    def num_rows(self) -> int:
        return sum(r.q_len for r in self.requests)


def random_tree(rng: random.Random, num_requests: int, levels: int, max_group: int, max_prefix: int,
                max_suffix: int, chunk: tuple[int, int] = (1, 1)) -> Batch:
    """Requests in prefix groups of random size (1 = no sharing), `levels` deep, ragged lengths."""
    batch = Batch()

    def fill(n: int, path: list[int], level: int) -> None:
        while n:
            size = min(n, rng.randint(1, max_group))
            if level < levels:
                pid = len(batch.prefix_len)
                batch.prefix_len[pid] = rng.randint(1, max_prefix)
                fill(size, path + [pid], level + 1)
            else:
                for _ in range(size):
                    q_len = rng.randint(*chunk)
                    batch.requests.append(Request(path, q_len, q_len + rng.randint(0, max_suffix)))
            n -= size

    fill(num_requests, [], 0)
    return batch


def run_case(batch: Batch, *, num_kv_heads=2, group=4, head_dim=64, page_size=16, dtype=torch.float32,
             seed=None, entry=fused_paged_attention, monkeypatch=None):
    seed = random.randrange(2**31) if seed is None else seed
    rng = random.Random(seed)
    gen = torch.Generator(DEVICE).manual_seed(seed)
    tokens = sum(r.kv_len for r in batch.requests) + sum(batch.prefix_len.values())
    num_pages = tokens // page_size + len(batch.requests) + len(batch.prefix_len) + 4
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)  # noqa: E731
    k_cache, v_cache = (randn(num_pages, page_size, num_kv_heads, head_dim) for _ in range(2))
    q = randn(batch.num_rows, num_kv_heads * group, head_dim)
    work = batch.work(page_size, num_pages, rng, DEVICE)
    if monkeypatch is not None:  # poison the scratch partials too
        monkeypatch.setattr(prefix_attention, "_empty",
                            lambda shape, dt, dev: torch.full(shape, float("nan"), dtype=dt, device=dev))
    out = torch.full_like(q, float("nan"))
    sm_scale = head_dim ** -0.5
    entry(q, k_cache, v_cache, work, sm_scale, out=out)
    ref = paged_attention_reference(q.float(), k_cache.float(), v_cache.float(), work, sm_scale)
    assert not out.isnan().any(), f"unwritten or NaN output (seed {seed})"
    err = (out.float() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-6)
    assert err.max().item() < TOL[dtype], f"row {err.argmax().item()} error {err.max().item():.2e} (seed {seed})"
    return work


# ---- CPU (interpreter) and GPU alike: small shapes ----

def test_decode_no_sharing(monkeypatch):
    """Prefix groups of size 1: each request's prefix item has one row."""
    run_case(random_tree(random.Random(), 6, levels=1, max_group=1, max_prefix=50, max_suffix=40),
             monkeypatch=monkeypatch)


def test_decode_group_of_two(monkeypatch):
    batch = Batch({0: 37, 1: 16}, [Request([0], 1, 5), Request([0], 1, 17), Request([1], 1, 1), Request([1], 1, 33)])
    run_case(batch, monkeypatch=monkeypatch)


@pytest.mark.parametrize("group", [1, 3, 8])
def test_decode_many_levels_gqa(group, monkeypatch):
    """Several levels of shared prefixes, big groups, ragged lengths, GQA ratios incl. non-powers of two."""
    batch = random_tree(random.Random(), 20, levels=3, max_group=12, max_prefix=70, max_suffix=30)
    run_case(batch, group=group, num_kv_heads=8 // group if group < 8 else 1, monkeypatch=monkeypatch)


@pytest.mark.parametrize("big_m", [64, 128])
def test_decode_one_big_group_split_k(big_m, monkeypatch):
    """One group bigger than a tile (several query blocks) over a prefix split across programs."""
    batch = Batch({0: 700}, [Request([0], 1, random.randint(1, 20)) for _ in range(37)])
    monkeypatch.setattr(prefix_attention, "_num_sms", lambda device: 64)  # many SMs: split the prefix
    monkeypatch.setattr(ap, "SPLIT_BIG_M", big_m)  # the big tile of split launches
    work = run_case(batch, monkeypatch=monkeypatch)
    plan = prefix_attention._plan_for(work, torch.empty(37, 8, 64, device=DEVICE), 2)
    assert plan.split_len < 700 and plan.num_merge_rows == 37 and plan.big_m == big_m


@pytest.mark.parametrize("page_size", [1, 4, 128])
def test_page_sizes(page_size, monkeypatch):
    batch = random_tree(random.Random(), 6, levels=2, max_group=4, max_prefix=90, max_suffix=40)
    run_case(batch, page_size=page_size, monkeypatch=monkeypatch)


# Triton 3.6's interpreter computes bf16 tl.dot wrongly (a 16x16 product is off by 1e10), so bf16
# runs on the GPU only.
BF16_ON_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(INTERPRET, reason="interpreter bf16 dot"))


@pytest.mark.parametrize("dtype", [torch.float16, BF16_ON_GPU])
def test_half_dtypes_head_dim_128(dtype, monkeypatch):
    batch = random_tree(random.Random(), 5, levels=2, max_group=3, max_prefix=40, max_suffix=30)
    run_case(batch, head_dim=128, dtype=dtype, num_kv_heads=1, monkeypatch=monkeypatch)


def test_extend_chunks_with_context_and_prefixes(monkeypatch):
    """Causal prefill chunks (ragged, with earlier context) under shared prefixes, through extend_attention."""
    batch = random_tree(random.Random(), 4, levels=2, max_group=3, max_prefix=40, max_suffix=50, chunk=(2, 40))
    run_case(batch, entry=extend_attention, monkeypatch=monkeypatch)


def test_extend_long_chunk_split_and_direct(monkeypatch):
    """A chunk without prefix (direct rows) next to a long one split over programs; fp16."""
    batch = Batch({}, [Request([], 9, 9), Request([], 150, 310), Request([], 1, 20)])
    monkeypatch.setattr(prefix_attention, "_num_sms", lambda device: 64)
    work = run_case(batch, entry=extend_attention, dtype=torch.float16, monkeypatch=monkeypatch)
    plan = prefix_attention._plan_for(work, torch.empty(160, 8, 64, device=DEVICE), 2)
    assert plan.split_len < 310 and plan.num_merge_rows < 160


def test_mixed_step_decodes_and_chunks(monkeypatch):
    batch = random_tree(random.Random(), 6, levels=2, max_group=3, max_prefix=30, max_suffix=20)
    batch.requests += [Request([], 17, 40), Request([0], 5, 5)]  # a new chunk joins prefix 0's group
    batch.requests.sort(key=lambda r: r.prefixes[:1] or [-1])  # keep prefix 0's rows together
    run_case(batch, monkeypatch=monkeypatch)


@pytest.mark.parametrize("heads_adjacent", [True, False])
def test_both_program_orders_give_the_reference(heads_adjacent, monkeypatch):
    """The 1-D grid with one tile's KV heads side by side and the 2-D grid (tile, head) cover the same work."""
    monkeypatch.setattr(prefix_attention, "HEADS_ADJACENT", heads_adjacent)
    batch = random_tree(random.Random(), 6, levels=2, max_group=3, max_prefix=30, max_suffix=20)
    batch.requests.append(Request([], 9, 30))
    run_case(batch, num_kv_heads=3, group=2, monkeypatch=monkeypatch)


@pytest.mark.parametrize("split_masked", [True, False])
def test_unmasked_whole_blocks_and_masked_ends_give_the_reference(split_masked, monkeypatch):
    """Segments of several key blocks (64 keys each): long shared prefixes, chunks over earlier context whose
    causal diagonal crosses blocks, a chunk starting at key 0, ragged decode suffixes, split-K pieces; the
    kernel with its whole blocks unmasked and with every block masked both give the reference."""
    monkeypatch.setattr(prefix_attention, "SPLIT_MASKED", split_masked)
    monkeypatch.setattr(prefix_attention, "_num_sms", lambda device: 8)  # long segments split over programs
    batch = Batch({0: 130, 1: 64, 2: 200},
                  [Request([0, 1], 1, 129), Request([0, 1], 1, 64), Request([0, 1], 40, 200),
                   Request([0], 1, 1), Request([2], 1, 65), Request([2], 1, 3),
                   Request([], 70, 70), Request([], 33, 161), Request([], 1, 300)])
    run_case(batch, monkeypatch=monkeypatch)
    run_case(batch, num_kv_heads=1, group=8, head_dim=32, page_size=32, dtype=torch.float16,
             monkeypatch=monkeypatch)


def test_uncovered_rows_are_zero():
    """The reference gives 0 for a row no item covers; so does the kernel (empty items too)."""
    k = torch.randn(4, 16, 1, 64, device=DEVICE)
    q = torch.randn(3, 2, 64, device=DEVICE)
    work = AttentionWork.from_lists([0, 2], [1, 1], [5, 0], [0, 0], [[1], [2]], device=DEVICE)
    out = fused_paged_attention(q, k, k, work, 0.1, out=torch.full_like(q, float("nan")))
    ref = paged_attention_reference(q, k, k, work, 0.1)
    torch.testing.assert_close(out, ref)


def test_plans_do_not_outlive_their_work_lists():
    """The launcher's plan caches drop a plan (its device tensors) when its work list dies: a plan left behind
    would keep the allocator segment it was carved from, a dropped engine's KV cache among them."""
    import gc
    k = torch.randn(4, 16, 1, 64, device=DEVICE)
    q = torch.randn(3, 2, 64, device=DEVICE)
    planned = AttentionWork.from_lists([0, 2], [1, 1], [5, 3], [0, 0], [[1], [2]], device=DEVICE)
    fused_paged_attention(q, k, k, planned, 0.1)  # planned here, cached as the last work list
    attached = AttentionWork.from_lists([0], [3], [20], [0], [[3, 1]], device=DEVICE)
    prefix_attention.attach_plan(attached, prefix_attention._plan_for(planned, q, 1))
    plan = weakref.ref(prefix_attention._plan_cache["last"][2])
    assert prefix_attention._bound_plans[id(attached)][0]() is attached
    other = AttentionWork.from_lists([0], [1], [4], [0], [[0]], device=DEVICE)
    prefix_attention.attach_plan(other, "another plan")
    del planned, attached
    gc.collect()
    assert "last" not in prefix_attention._plan_cache and plan() is None
    assert set(prefix_attention._bound_plans) == {id(other)}  # the live work list keeps its plan
    del other
    gc.collect()
    assert not prefix_attention._bound_plans


def test_other_head_dims_fall_back_with_one_warning():
    k = torch.randn(4, 16, 1, 48, device=DEVICE)
    q = torch.randn(2, 2, 48, device=DEVICE)
    work = AttentionWork.from_lists([0], [2], [20], [0], [[3, 1]], device=DEVICE)
    prefix_attention._warned_fallback.discard(48)
    with pytest.warns(UserWarning, match="head_dim 48"):
        out = fused_paged_attention(q, k, k, work, 0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused_paged_attention(q, k, k, work, 0.1)
    torch.testing.assert_close(out, paged_attention_reference(q, k, k, work, 0.1))


def test_plan_tiles_cover_every_key_once():
    """Pure host planning: every (row, visible key) pair lies in exactly one tile."""
    rng = random.Random()
    batch = random_tree(rng, 12, levels=2, max_group=6, max_prefix=300, max_suffix=200, chunk=(1, 30))
    work = batch.work(16, 10_000, rng, "cpu")
    plan = ap.build_plan(work, batch.num_rows, group=4, num_kv_heads=2, num_sms=8, block_n=64,
                         device=torch.device("cpu"))
    seen = {}
    for row0, n_rows, kv_start, kv_end, shift, page_start, _, _ in plan.tiles.tolist():
        for r in range(row0, row0 + n_rows):
            seen.setdefault((r, page_start), []).append((kv_start, kv_end))
    for start, q_len, kv_len, causal, page_start in zip(*(t.tolist() for t in (
            work.q_start, work.q_len, work.kv_len, work.causal, work.page_start))):
        for i in range(q_len):
            spans = sorted(seen[(start + i, page_start)])
            last = kv_len - q_len + i + 1 if causal else kv_len
            assert spans[0][0] == 0 and spans[-1][1] >= last
            assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert np.diff(plan.merge_ptr.numpy()).min(initial=2) >= 2  # merge rows have >= 2 partials here



@pytest.mark.parametrize("big_m_max", [ap.BIG_M_MAX, ap.SPLIT_BIG_M])
def test_every_plan_lists_its_big_tiles_first(big_m_max):
    """Each tile class has its own launch over its slice of the table (a fixed grid: from the counts), so
    decode plans as well as eager ones must hold the big tiles, and only them, in [0, num_big)."""
    rng = random.Random(big_m_max)  # a fixed tree: it has groups of both tile classes
    batch = random_tree(rng, 24, levels=2, max_group=12, max_prefix=300, max_suffix=200)
    work = batch.work(16, 10_000, rng, "cpu")
    plan = ap.plan_on_host(work, batch.num_rows, group=4, num_kv_heads=2, num_sms=8, block_n=64,
                           big_m_max=big_m_max)
    flags = plan.tiles[:, ap.BIG]
    assert 0 < plan.num_big < plan.num_tiles
    assert flags[:plan.num_big].all() and not flags[plan.num_big:].any()

# ---- GPU: real sizes (llama-8b heads), fp32 reference, tolerances of METHOD.md ----

def llama_batch(num_requests, group_size, prefix_len, suffix_len, levels=1):
    rng = random.Random()
    batch = Batch()
    for g in range(num_requests // group_size):
        batch.prefix_len[g] = prefix_len
        path = [g]
        if levels == 2:
            batch.prefix_len[1000 + g] = rng.randint(1, 300)
            path = [g, 1000 + g]
        batch.requests += [Request(path, 1, rng.randint(1, suffix_len)) for _ in range(group_size)]
    return batch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group_size,prefix_len,levels", [(1, 1000, 1), (32, 2048, 2), (128, 8200, 1)])
def test_gpu_decode_llama_sizes(dtype, group_size, prefix_len, levels):
    run_case(llama_batch(256, group_size, prefix_len, 512, levels), num_kv_heads=8, group=4, head_dim=128,
             dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head_dim,group,page_size", [(128, 4, 16), (64, 7, 32), (64, 1, 64)])
def test_gpu_extend_and_mixed(head_dim, group, page_size):
    batch = random_tree(random.Random(), 48, levels=2, max_group=16, max_prefix=1500, max_suffix=700,
                        chunk=(1, 600))
    run_case(batch, num_kv_heads=2, group=group, head_dim=head_dim, page_size=page_size, dtype=torch.bfloat16,
             entry=extend_attention)


def test_engine_with_triton_attention_gives_the_reference_tokens(tiny_llama_dir):
    """The engine's whole path through the Triton kernels (the interpreter here, CUDA on a GPU):
    shared prefixes, chunked prefill and decode give the same greedy tokens as the torch reference."""
    from batchllm_dask.engine import Engine, SamplingParams
    device = "cuda" if torch.cuda.is_available() else "cpu"
    prompts = [f"System: be brief.\nDoc: rivers and stones {i % 2}.\nQ{i}: what now?" for i in range(8)]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    options = dict(dtype="float32", device=device, min_shared_tokens=1, max_num_batched_tokens=64)
    reference = Engine(tiny_llama_dir, attention_backend="torch", **options).generate(prompts, params)
    fused_engine = Engine(tiny_llama_dir, attention_backend="triton", **options)
    fused = fused_engine.generate(prompts, params)
    assert fused_engine.last_stats.shared_prefixes >= 2
    assert [o.token_ids for o in fused] == [o.token_ids for o in reference]


def test_a_moved_work_list_keeps_its_host_copy_for_planning():
    """The engine builds the work list on the host and moves it: the planner then reads the host copy
    (no device-to-host round trip per step) and plans exactly what it would from the moved tensors."""
    work = AttentionWork.from_lists([0, 2], [2, 1], [5, 3], [0, 1], [[4, 1], [7]])
    moved = work.to(DEVICE)
    assert moved.host is work
    from_host = ap.plan_on_host(moved, 3, 4, 2, 132, 32)
    from_device = ap.plan_on_host(AttentionWork(*[getattr(moved, f) for f in (
        "q_start", "q_len", "kv_len", "causal", "page_start", "page_ids", "num_items", "max_q_len", "max_kv_len")]),
        3, 4, 2, 132, 32)
    assert np.array_equal(from_host.tiles, from_device.tiles)
