"""The scheduler, run against a simulated model (no torch): its invariants under any batch."""
from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm_dask.engine.config import SamplingParams
from batchllm_dask.engine.kv_cache import PageAllocator, pages_for
from batchllm_dask.engine.prefix_tree import build_prefix_plan
from batchllm_dask.engine.scheduler import Scheduler, StepBatch, order_requests
from batchllm_dask.engine.sequence import PrefixSeq, RequestSeq, Status


def _sequences(prompts, max_tokens, threshold=1):
    """Requests in plan order below their PrefixSeqs, as the engine builds them."""
    plan = build_prefix_plan(prompts, threshold)
    order = order_requests(plan, [m / len(p) for p, m in zip(prompts, max_tokens)])
    prefixes: list[PrefixSeq] = []
    for p in plan.prefixes:
        parent = prefixes[p.parent] if p.parent is not None else None
        prefixes.append(PrefixSeq(p.start, list(p.tokens), parent, rank=len(order), prefix_id=p.id))
    requests = []
    for rank, i in enumerate(order):
        start, node = plan.suffix_start(i), plan.request_prefix[i]
        seq = RequestSeq(start, list(prompts[i][start:]), prefixes[node] if node is not None else None, rank,
                         index=i, params=SamplingParams(max_tokens=max_tokens[i]), num_prompt=len(prompts[i]) - start)
        for prefix in seq.ancestors():
            prefix.users += 1
            prefix.rank = min(prefix.rank, rank)
        requests.append(seq)
    return plan, prefixes, requests


def _check_step(batch: StepBatch, scheduler: Scheduler, budget: int, num_pages: int) -> None:
    assert batch.num_tokens <= budget, "the step token budget is respected"
    running = list(scheduler.running.values())
    owners = {id(s): s for s in running + scheduler.prefilling}
    owners.update({id(a): a for s in running for a in s.ancestors()})
    held = [p for s in owners.values() for p in s.pages]
    assert len(held) == len(set(held)), "no page has two owners"
    assert len(held) <= scheduler.allocator.num_used <= num_pages, "pages in use never exceed the pool"
    for chunk in batch.decodes + batch.prefills:
        assert chunk.seq.context_ready() or isinstance(chunk.seq, PrefixSeq), "context computed before use"
        assert len(chunk.seq.pages) * scheduler.page_size >= chunk.start + chunk.length, "KV slots allocated"
    ranks = [c.seq.rank for c in batch.decodes]
    assert ranks == sorted(ranks), "decode rows in plan order, so prefix groups are contiguous"
    _check_table(scheduler)


def _check_table(scheduler: Scheduler) -> None:
    """The RequestTable's columns are those of the running requests (the decode pass reads only them)."""
    table = scheduler.table
    for seq in scheduler.running.values():
        slot = seq.slot
        assert table.seqs[slot] is seq and seq.table is table
        assert (table.length[slot], table.computed[slot]) == (len(seq.tokens), seq.num_computed)
        assert table.num_pages[slot] == len(seq.pages) and table.pages[slot, :len(seq.pages)].tolist() == seq.pages
        assert table.draining[slot] == (seq.status is Status.DRAINING)


def _simulate(prompts, max_tokens, num_pages, page_size, budget, stop_at=None, decode_reserve=1.0):
    """Run the scheduler to the end, 'sampling' token 7; returns per-request outputs and counters."""
    plan, prefixes, requests = _sequences(prompts, max_tokens)
    scheduler = Scheduler(requests, PageAllocator(num_pages), page_size, budget, max_running=64,
                          decode_reserve=decode_reserve)
    finished: Counter = Counter()
    computed: Counter = Counter()
    outputs, failed = {}, set()
    for _ in range(100_000):
        if scheduler.done:
            break
        batch = scheduler.schedule()
        failed.update(s.index for s in batch.failed)
        finished.update(s.index for s in batch.failed)
        assert batch.num_tokens > 0 or scheduler.done, "progress"
        _check_step(batch, scheduler, budget, num_pages)
        for chunk in batch.prefills:
            if isinstance(chunk.seq, PrefixSeq):
                computed[chunk.seq.prefix_id] += chunk.length
        sampled = batch.sampled
        scheduler.commit(batch)
        for chunk in sampled:
            seq = chunk.seq
            seq.tokens.append(7)
            if len(seq.output) >= seq.params.max_tokens or (stop_at and len(seq.output) >= stop_at(seq.index)):
                scheduler.finish(seq)
                finished[seq.index] += 1
                outputs[seq.index] = list(seq.output)
    assert scheduler.done
    assert scheduler.allocator.num_used == 0, "every page is returned"
    return plan, finished, computed, outputs, failed, scheduler


_prompts = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=40), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(_prompts, st.data(), st.sampled_from([1, 2, 4, 8]), st.integers(16, 64), st.integers(4, 200),
       st.sampled_from([0.0, 0.5, 1.0]))
def test_every_request_finishes_once_within_budgets(prompts, data, page_size, budget, num_pages, reserve):
    max_tokens = data.draw(st.lists(st.integers(1, 12), min_size=len(prompts), max_size=len(prompts)))
    plan, finished, computed, outputs, failed, _ = _simulate(prompts, max_tokens, num_pages, page_size, budget,
                                                             decode_reserve=reserve)
    assert sorted(finished) == list(range(len(prompts))) and set(finished.values()) == {1}
    for i, out in outputs.items():
        assert len(out) == max_tokens[i], "no token lost or duplicated, preempted or not"
    for i in failed:
        assert pages_for(len(prompts[i]) + max_tokens[i], page_size) > 0


@settings(max_examples=100, deadline=None)
@given(_prompts, st.sampled_from([1, 4, 16]), st.integers(16, 64))
def test_each_shared_prefix_is_prefilled_once_when_memory_suffices(prompts, page_size, budget):
    max_tokens = [5] * len(prompts)
    plan, finished, computed, outputs, failed, scheduler = _simulate(prompts, max_tokens, 10_000, page_size, budget)
    assert not failed and scheduler.num_preemptions == 0
    assert {p.id: len(p.tokens) for p in plan.prefixes} == dict(computed) or not plan.prefixes


def test_memory_pressure_without_a_reserve_preempts_and_still_completes():
    prompts = [[1] * 30 + [i] * 10 for i in range(2, 12)]
    plan, finished, computed, outputs, failed, scheduler = _simulate(prompts, [40] * 10, 24, 4, 64, decode_reserve=0.0)
    assert scheduler.num_preemptions > 0
    assert not failed and all(len(o) == 40 for o in outputs.values())


def test_memory_pressure_with_the_full_reserve_never_preempts():
    prompts = [[1] * 30 + [i] * 10 for i in range(2, 12)]
    plan, finished, computed, outputs, failed, scheduler = _simulate(prompts, [40] * 10, 24, 4, 64)
    assert scheduler.num_preemptions == 0 and scheduler.recomputed_tokens == 0
    assert not failed and all(len(o) == 40 for o in outputs.values())


@settings(max_examples=150, deadline=None)
@given(_prompts, st.data(), st.sampled_from([1, 2, 4, 8]), st.integers(16, 64), st.integers(4, 200))
def test_a_full_reserve_never_preempts(prompts, data, page_size, budget, num_pages):
    """With every request's budget known (no early stops), admission by memory with the full decode reserve
    makes preemption impossible, however scarce the pool."""
    max_tokens = data.draw(st.lists(st.integers(1, 12), min_size=len(prompts), max_size=len(prompts)))
    *_, outputs, failed, scheduler = _simulate(prompts, max_tokens, num_pages, page_size, budget)
    assert scheduler.num_preemptions == 0
    assert all(len(out) == max_tokens[i] for i, out in outputs.items())


class _ListAllocator:
    """The allocator as it was: every free id in one list, popped from the end."""

    def __init__(self, num_pages: int):
        self.free_ids = list(range(num_pages - 1, -1, -1))

    def allocate(self, n: int) -> list[int]:
        return [self.free_ids.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self.free_ids.extend(reversed(pages))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64), st.lists(st.tuples(st.booleans(), st.integers(0, 12)), max_size=60))
def test_page_allocator_hands_out_the_ids_a_full_free_list_would(num_pages, ops):
    """The allocator keeps never-used pages as a counter; the ids it hands out, in order, and its free count are
    those of a list of every free id."""
    alloc, reference, held = PageAllocator(num_pages), _ListAllocator(num_pages), []
    for is_free, n in ops:
        if is_free and held:
            pages = held.pop(n % len(held))
            alloc.free(pages)
            reference.free(pages)
        elif not is_free and n <= len(reference.free_ids):
            pages = alloc.allocate(n)
            assert pages == reference.allocate(n)
            held.append(pages)
        assert alloc.num_free == len(reference.free_ids)
        assert alloc.num_used == num_pages - alloc.num_free
    assert sorted(p for pages in held for p in pages) == sorted(set(range(num_pages)) - set(reference.free_ids))


def test_request_larger_than_the_pool_fails_alone():
    prompts = [[1] * 8, [2] * 200, [3] * 8]
    _, finished, _, outputs, failed, _ = _simulate(prompts, [4, 4, 4], 20, 4, 64)
    assert failed == {1} and sorted(outputs) == [0, 2]


def test_decode_first_inside_a_group():
    system = [9] * 40
    prompts = [system + [1] * 20, system + [2] * 5, system + [3] * 10]
    max_tokens = [10, 50, 10]
    plan = build_prefix_plan(prompts, 1)
    order = order_requests(plan, [m / (len(p) - plan.suffix_start(i)) for i, (p, m) in enumerate(zip(prompts, max_tokens))])
    assert order == [1, 2, 0]


def test_early_stops_free_memory_for_others():
    prompts = [[i] * 20 for i in range(10)]
    _, finished, _, outputs, failed, _ = _simulate(prompts, [30] * 10, 40, 4, 64, stop_at=lambda i: 3)
    assert not failed and all(len(o) == 3 for o in outputs.values())
