"""The host-time benchmark's stub keeps the engine's host work: the same schedule as the real engine, with the
tile plan made every step (timings are printed by the script, not asserted here)."""
from __future__ import annotations

from batchllm_dask.bench import host_time
from batchllm_dask.bench.workloads import Spec, make_workload
from batchllm_dask.engine import Engine, SamplingParams

SMALL = Spec(n_systems=2, system_len=(48, 48), docs_per_system=1, doc_len=(0, 0), questions_per_doc=5,
             question_len=(4, 20), output_len=6)


def test_the_host_only_engine_schedules_as_the_real_one_and_plans_every_step(tmp_path, monkeypatch):
    stub = host_time.make_engine(tmp_path)
    planned = []
    real_plan = host_time.prefix_attention.host_plan
    monkeypatch.setattr(host_time.prefix_attention, "host_plan", lambda *a, **k: planned.append(1) or real_plan(*a, **k))
    monkeypatch.setattr(host_time.graphs_module, "host_plan", lambda *a, **k: planned.append(1) or real_plan(*a, **k))
    result = host_time.measure(stub, SMALL, 1.0)

    real = Engine(tmp_path / "tiny-1b-heads", dtype="float32", device="cpu", cuda_graphs=False,
                  max_num_batched_tokens=host_time.TOKEN_BUDGET, max_num_seqs=host_time.MAX_NUM_SEQS,
                  page_size=host_time.PAGE_SIZE, kv_cache_bytes=stub.config.kv_cache_bytes)
    reqs = make_workload(SMALL, host_time.SHAPE.vocab, 1.0)
    real.generate([r.prompt_token_ids for r in reqs],
                  [SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True) for r in reqs])
    assert result["steps"] == real.last_stats.steps
    assert result["tokens_per_step"] == real.last_stats.mean_tokens_per_step
    assert len(planned) >= result["steps"], "a tile plan for every step (eager or graphed)"
    assert set(result["ms_per_step"]) == set(host_time._PHASES)
