"""Beyond one GPU: data parallel through Dask (1 GPU worker vs 2) and tensor parallel inside the engine (TP=2).

Data parallel: the same token-id workload (workloads.py; greedy, EOS ignored)
through `ddf.llm.generate` on a cluster of one worker per GPU (a Nanny per
GPU with CUDA_VISIBLE_DEVICES set, resources GPU=1, one thread), first with
one worker, then with two.  The job is planned with one output partition per
worker, the plan's placement noted (`assignment.note_plan`) and computed
inside `batchllm_dask.gpu_resources()`.  Each run is warmed up once (engines
loaded, CUDA graphs captured), then timed; per GPU worker the seconds its
`run_partition` tasks computed (its busy time) are reported, with the
speed-up (target >= 1.9x on 2 GPUs) and whether every partition ran on the
worker the assignment chose.

Tensor parallel: `Engine(model)` on one GPU and `Engine(model,
tensor_parallel_size=2)` on two, the same requests: throughput of each, and
how many requests got identical greedy tokens (bf16: the all-reduce sums in
another order than one GPU's matmul, so rare near-ties may differ; they are
counted, not hidden).  If capturing CUDA graphs with NCCL collectives fails,
the TP engine is built again without graphs and that is reported.

On the device (two GPUs; NVLink multicast stays off in every process):
    python -m batchllm_dask.bench.parallel                      # llama-8b, shared-instructions and skewed
    python -m batchllm_dask.bench.parallel --scale 0.25         # quicker
With one GPU it runs the one-worker data-parallel check and says what it skipped.
On a CPU, to check the script itself (tiny model, 2 CPU workers, 2 gloo ranks, seconds):
    python -m batchllm_dask.bench.parallel --tiny
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ..engine.parallel import multicast_off
from .checkpoints import save_random_checkpoint, save_tiny_checkpoint
from .cuda import free_memory, synchronize
from .workloads import WORKLOADS, make_workload, summary

TINY = {"shared-instructions": "tiny-shared-instructions", "skewed": "tiny-skewed"}


def _tiny_workloads() -> None:
    import dataclasses
    WORKLOADS.setdefault("tiny-shared-instructions", dataclasses.replace(
        WORKLOADS["shared-instructions"], n_systems=4, system_len=(96, 96), questions_per_doc=6,
        question_len=(8, 24), output_len=6, description="script check"))
    WORKLOADS.setdefault("tiny-skewed", dataclasses.replace(
        WORKLOADS["skewed"], n_systems=6, system_len=(32, 96), questions_per_doc=4, question_len=(4, 32),
        output_len=6, description="script check"))


def gpu_count() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def one_worker_per_gpu(n: int, gpu: bool) -> Any:
    """A cluster of n single-threaded worker processes declaring GPU=1, each seeing only its own GPU."""
    from distributed import Nanny, Scheduler, SpecCluster
    workers = {f"gpu{i}": {"cls": Nanny, "options": {
        "nthreads": 1, "resources": {"GPU": 1},
        "env": multicast_off({"CUDA_VISIBLE_DEVICES": str(i)} if gpu else {})}} for i in range(n)}
    return SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}})


def _busy_by_worker(stream: list[dict]) -> tuple[dict[str, float], dict[int, str]]:
    """(seconds each worker computed the generating tasks, partition -> worker that ran it)."""
    busy: dict[str, float] = {}
    ran: dict[int, str] = {}
    for t in stream:
        key = t["key"]
        if not (isinstance(key, tuple) and ("run_partition" in str(key[0]) or "generate_partition" in str(key[0]))):
            continue
        ran[key[1]] = t["worker"]
        busy[t["worker"]] = busy.get(t["worker"], 0.0) + sum(
            s["stop"] - s["start"] for s in t["startstops"] if s["action"] == "compute")
    return busy, ran


def run_data_parallel(model: str, prompts: list[list[int]], max_tokens: int, n_workers: int,
                      engine_options: dict, gpu: bool, repeats: int) -> dict[str, Any]:
    """One planned, placed `ddf.llm.generate` job on n_workers GPU workers: seconds, busy time, placement."""
    import dask.dataframe as dd
    import pandas as pd
    import pyarrow as pa
    from distributed import Client, get_task_stream

    import batchllm_dask
    from batchllm_dask import planning
    from batchllm_dask.assignment import clear_placement, note_plan

    frame = pd.DataFrame({"prompt": pd.Series(prompts, dtype=pd.ArrowDtype(pa.list_(pa.int32())))})
    ddf = dd.from_pandas(frame, npartitions=max(8, 2 * n_workers))
    with one_worker_per_gpu(n_workers, gpu) as cluster, Client(cluster) as client:
        client.wait_for_workers(n_workers)
        tok = planning.tokenize(ddf, "prompt", model, chat=False)
        stats = tok.map_partitions(planning.partition_stats, 16, meta=planning._STATS_META).compute()
        mapping = note_plan(planning.build_plan(stats, n_workers, max_tokens, 16), client)
        out = ddf.llm.generate("prompt", model, npartitions=n_workers, max_tokens=max_tokens, temperature=0.0,
                               ignore_eos=True, **engine_options)
        try:
            with batchllm_dask.gpu_resources():
                out.compute()  # warm-up: every worker loads its engine, captures its graphs
            runs = []
            for _ in range(repeats):
                with get_task_stream(client) as stream, batchllm_dask.gpu_resources():
                    start = time.perf_counter()
                    result = out.compute()
                    runs.append((time.perf_counter() - start, stream.data))
        finally:
            clear_placement()
    seconds, data = min(runs, key=lambda r: r[0])
    busy, ran = _busy_by_worker(data)
    result = result.sort_index()
    return {"workers": n_workers, "seconds": seconds, "all_seconds": [r[0] for r in runs],
            "output_tokens_per_s": int(result["completion_tokens"].sum()) / seconds,
            "busy_seconds_per_worker": busy, "busiest_over_mean": max(busy.values()) / (sum(busy.values()) / len(busy)),
            "placement": {str(k): v for k, v in (mapping or {}).items()}, "ran_on": {str(k): v for k, v in ran.items()},
            "placement_followed": mapping is None or ran == mapping,
            "complete": bool((result["completion_tokens"] == max_tokens).all()),
            "completions": result["completion"].tolist()}


def run_tensor_parallel(model: str, prompts: list[list[int]], max_tokens: int, engine_options: dict,
                        size: int) -> dict[str, Any]:
    """One engine on one device vs a tensor_parallel_size=size engine: seconds and greedy token equality."""
    from batchllm_dask.engine import Engine, SamplingParams
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    single = Engine(model, **engine_options)
    one = _timed(single, prompts, sampling)
    del single
    free_memory()
    graphs_ok = True
    try:
        tp = Engine(model, tensor_parallel_size=size, **engine_options)
    except RuntimeError as exc:  # CUDA graphs over NCCL collectives did not capture: run eager and say so
        print(f"TP engine with CUDA graphs failed ({exc!r}); again without graphs", flush=True)
        graphs_ok = False
        free_memory()
        tp = Engine(model, tensor_parallel_size=size, **{**engine_options, "cuda_graphs": False})
    try:
        many = _timed(tp, prompts, sampling)
    finally:
        tp.close()
    same = sum(a == b for a, b in zip(one["tokens"], many["tokens"]))
    return {"size": size, "single_seconds": one["seconds"], "tp_seconds": many["seconds"],
            "single_output_tokens_per_s": one["tokens_per_s"], "tp_output_tokens_per_s": many["tokens_per_s"],
            "tp_over_single": one["seconds"] / many["seconds"], "identical_requests": same,
            "requests": len(prompts), "tp_cuda_graphs": graphs_ok and engine_options.get("device") == "cuda"}


def _timed(engine: Any, prompts: list[list[int]], sampling: Any) -> dict[str, Any]:
    engine.generate(prompts[: max(1, len(prompts) // 8)], sampling)  # warm-up
    synchronize()
    start = time.perf_counter()
    outs = engine.generate(prompts, sampling)
    synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": [list(o.token_ids) for o in outs],
            "tokens_per_s": sum(o.completion_tokens for o in outs) / seconds}


def _device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    multicast_off()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama-8b")
    ap.add_argument("--workloads", default="shared-instructions,skewed")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per data-parallel setting (best reported)")
    ap.add_argument("--kv-cache-gib", type=float, default=48.0, help="each engine's (each rank's) KV pool")
    ap.add_argument("--skip-tp", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU check: tiny model, 2 CPU workers, 2 gloo ranks")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the json report")
    args = ap.parse_args(argv)
    gpus = gpu_count()
    if args.tiny:
        _tiny_workloads()
    report: dict[str, Any] = {"device": _device_name(), "gpus": gpus, "shape": "tiny" if args.tiny else args.shape,
                              "scale": args.scale, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "data_parallel": {}, "tensor_parallel": {}, "skipped": []}
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        model, vocab, options, gpu = _setup(args, Path(tmp), gpus)
        if not gpu and not args.tiny:
            raise SystemExit("no GPU: run with --tiny for the CPU check of the script")
        two = args.tiny or gpus >= 2
        if not two:
            report["skipped"].append(f"2-GPU data parallel and TP=2: {gpus} GPU visible")
            print(f"skipping the 2-GPU parts: {gpus} GPU visible (they need 2)", flush=True)
        for name in args.workloads.split(","):
            workload = TINY.get(name, name) if args.tiny else name
            reqs = make_workload(workload, vocab_size=vocab, scale=args.scale)
            prompts, max_tokens = [r.prompt_token_ids for r in reqs], reqs[0].max_tokens
            print(f"{workload}: {summary(reqs)}", flush=True)
            runs = [run_data_parallel(model, prompts, max_tokens, n, options, gpu, args.repeats)
                    for n in ((1, 2) if two else (1,))]
            report["data_parallel"][workload] = _data_parallel_report(runs)
        if two and not args.skip_tp:
            reqs = make_workload(TINY["shared-instructions"] if args.tiny else "shared-instructions",
                                 vocab_size=vocab, scale=args.scale)
            report["tensor_parallel"] = run_tensor_parallel(model, [r.prompt_token_ids for r in reqs],
                                                            reqs[0].max_tokens, options, 2)
            _print_tp(report["tensor_parallel"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"bench_parallel_{report['shape']}_{args.scale:g}.json").write_text(json.dumps(report, indent=2))
    return report


def _setup(args, tmp: Path, gpus: int) -> tuple[str, int, dict, bool]:
    if args.tiny:  # heads 4, KV heads 2: both shard over 2 ranks
        model = save_tiny_checkpoint(tmp / "tiny", 512)
        return str(model), 512, {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 32 << 20}, False
    from ..roofline import SHAPES
    start = time.perf_counter()
    model = save_random_checkpoint(tmp / args.shape, args.shape, device="cuda" if gpus else "cpu")
    print(f"checkpoint {args.shape} written in {time.perf_counter() - start:.1f} s", flush=True)
    free_memory()
    options = {"dtype": "bfloat16", "device": "cuda", "kv_cache_bytes": int(args.kv_cache_gib * 2**30)}
    return str(model), SHAPES[args.shape].vocab, options, gpus > 0


def _data_parallel_report(runs: list[dict]) -> dict[str, Any]:
    for r in runs:
        busy = ", ".join(f"{w.rsplit(':', 1)[-1]} {s:.2f} s" for w, s in sorted(r["busy_seconds_per_worker"].items()))
        print(f"  {r['workers']} worker(s): {r['seconds']:.2f} s, {r['output_tokens_per_s']:.0f} output tok/s; "
              f"busy per worker: {busy}; placement followed: {r['placement_followed']}; complete: {r['complete']}",
              flush=True)
    out: dict[str, Any] = {f"{r['workers']}_workers": {k: v for k, v in r.items() if k != "completions"} for r in runs}
    if len(runs) == 2:
        speedup = runs[0]["seconds"] / runs[1]["seconds"]
        same = runs[0]["completions"] == runs[1]["completions"]
        out.update(speedup=speedup, meets_1_9x=speedup >= 1.9, same_completions=same)
        print(f"  speed-up on 2 workers: {speedup:.2f}x (target 1.9x); same completions: {same}", flush=True)
    return out


def _print_tp(tp: dict[str, Any]) -> None:
    print(f"TP={tp['size']}: {tp['tp_seconds']:.2f} s ({tp['tp_output_tokens_per_s']:.0f} tok/s) vs one device "
          f"{tp['single_seconds']:.2f} s ({tp['single_output_tokens_per_s']:.0f} tok/s): {tp['tp_over_single']:.2f}x; "
          f"identical greedy tokens: {tp['identical_requests']}/{tp['requests']} requests; "
          f"CUDA graphs: {tp['tp_cuda_graphs']}", flush=True)


if __name__ == "__main__":
    main()
