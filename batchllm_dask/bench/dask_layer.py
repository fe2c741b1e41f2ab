"""What the Dask layer costs: one workload through `Engine.generate` directly and through `ddf.llm.generate`.

Both paths see the same token-id requests (workloads.py), greedy, EOS ignored.
The Dask path is the whole thing: `dd.read_parquet` of the rows (or
`dd.from_pandas`), tokenizing, the engine on a LocalCluster of one GPU worker
(threads_per_worker=1, resources GPU=1, computed inside
`batchllm_dask.gpu_resources()`), and the result frame back to the client.

The engine's own time varies from run to run by more than the 10% the target
allows (host-bound steps on a shared host), so the two paths are measured in
pairs: both engines stay loaded (this process's and the worker's, each with a
fixed KV pool, `--kv-cache-gib`), each is warmed up on the whole workload (every
CUDA graph captured), then every repeat runs direct, then each Dask source,
back to back.  The figure is the median over pairs of direct time / Dask time
(Dask throughput as a share of direct).  Each Dask run also reports the
worker's own `Engine.generate` time, so that a run splits into the engine
and the rest (what the Dask layer itself cost).

On the device (after `source benchmarks/device_setup.sh`):
    python -m batchllm_dask.bench.dask_layer         # shared-instructions, scale 1.0
On a CPU, to check the script itself (tiny model, tiny workload, seconds):
    python -m batchllm_dask.bench.dask_layer --tiny
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from .checkpoints import save_random_checkpoint, save_tiny_checkpoint
from .cuda import free_memory, synchronize
from .workloads import WORKLOADS, make_workload, summary

TINY_WORKLOAD = "tiny-shared-instructions"
WORKLOADS.setdefault(TINY_WORKLOAD, dataclasses.replace(
    WORKLOADS["shared-instructions"], n_systems=4, system_len=(96, 96), question_len=(8, 24), output_len=6,
    description="4 instruction prefixes of 96 tokens x rows of 8-24 tokens, 6 out (script check)"))


class DirectPath:
    """`Engine.generate` on every prompt at once, in this process."""

    def __init__(self, model: str, prompts: list[list[int]], max_tokens: int, engine_options: dict) -> None:
        from batchllm_dask.engine import Engine, SamplingParams
        self.prompts = prompts
        self.sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.engine = Engine(model, **engine_options)
        self.tokens: list[list[int]] = []

    def run(self) -> float:
        synchronize()
        start = time.perf_counter()
        outs = self.engine.generate(self.prompts, self.sampling)
        synchronize()
        seconds = time.perf_counter() - start
        self.tokens = [list(o.token_ids) for o in outs]
        return seconds


class DaskPath:
    """`ddf.llm.generate(...).compute()` on the cluster of `client`, from parquet or from memory."""

    def __init__(self, client: Any, model: str, frame: pd.DataFrame, options: dict, parquet: Path | None,
                 input_partitions: int) -> None:
        import dask.dataframe as dd
        self.client = client
        ddf = dd.read_parquet(parquet) if parquet else dd.from_pandas(frame, npartitions=input_partitions)
        self.out = ddf.llm.generate("prompt", model, **options)
        self.result: pd.DataFrame | None = None
        self.annotated = False

    def run(self) -> tuple[float, float, float]:
        """(seconds, the worker's Engine.generate seconds, seconds its profiler sampled)."""
        import batchllm_dask
        from batchllm_dask.caches import engine_stats
        _wait_until_released(self.client)  # else the scheduler may still hold the last run's result
        sampled = _profile_seconds(self.client)
        start = time.perf_counter()
        with batchllm_dask.gpu_resources() as self.annotated:
            self.result = self.out.compute()
        seconds = time.perf_counter() - start
        engine = sum(s.seconds for s in self.client.run(engine_stats).values() if s is not None)
        return seconds, engine, _profile_seconds(self.client) - sampled


def run_paired(model: str, prompts: list[list[int]], max_tokens: int, engine_options: dict, gpu: bool,
               sources: dict[str, Path | None], input_partitions: int, npartitions: int | None, repeats: int,
               pause_profiler: bool = True) -> dict[str, Any]:
    """Warm up every path on the whole workload, then `repeats` rounds of: direct, then each Dask source."""
    import dask
    from distributed import Client, LocalCluster

    import batchllm_dask
    from batchllm_dask.worker import PAUSE_PROFILER

    frame = pd.DataFrame({"prompt": pd.Series(prompts, dtype=pd.ArrowDtype(pa.list_(pa.int32())))})
    # npartitions None: the default, one output partition per GPU worker (here one).
    options = dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, npartitions=npartitions, **engine_options)
    direct = DirectPath(model, prompts, max_tokens, engine_options)
    direct.run()  # warm-up: captures the CUDA graphs the timed runs replay
    times: dict[str, list[Any]] = {"direct": [], **{s: [] for s in sources}}
    with dask.config.set({PAUSE_PROFILER: pause_profiler}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, resources={"GPU": 1} if gpu else None,
                         dashboard_address=None) as cluster, Client(cluster) as client:
        paths = {s: DaskPath(client, model, frame, options, path, input_partitions) for s, path in sources.items()}
        for path in paths.values():
            path.run()  # warm-up: loads the worker's engine, captures its graphs
        for _ in range(repeats):
            times["direct"].append(direct.run())
            for source, path in paths.items():
                times[source].append(path.run())
        loads = sum(client.run(batchllm_dask.engine_loads).values())
    report = {"direct": _direct_report(times["direct"], direct, max_tokens)}
    for source, path in paths.items():
        report[source] = _dask_report(times[source], times["direct"], path, max_tokens, loads)
    del direct
    free_memory()
    return report


def _direct_report(seconds: list[float], direct: DirectPath, max_tokens: int) -> dict[str, Any]:
    return {"seconds": statistics.median(seconds), "all_seconds": seconds,
            "complete": all(len(t) == max_tokens for t in direct.tokens)}


def _dask_report(runs: list[tuple[float, float, float]], direct: list[float], path: DaskPath, max_tokens: int,
                 loads: int) -> dict[str, Any]:
    seconds, engine, profiler = (list(x) for x in zip(*runs))
    ratios = [d / s for d, s in zip(direct, seconds)]  # Dask throughput over direct throughput, per pair
    result = path.result
    complete = bool((result.finish_reason != "error").all()) and bool((result.completion_tokens == max_tokens).all())
    return {"seconds": statistics.median(seconds), "all_seconds": seconds, "engine_seconds": engine,
            "rest_seconds": [s - e for s, e in zip(seconds, engine)], "profiler_seconds": profiler,
            "pair_ratios": ratios, "ratio": statistics.median(ratios),
            "worker_engine_over_direct": statistics.median(e / d for e, d in zip(engine, direct)),
            "within_10_percent": statistics.median(ratios) >= 0.9, "complete": complete,
            "annotated": path.annotated, "engine_loads": loads, "partitions": path.out.npartitions}


def _wait_until_released(client: Any, timeout: float = 30.0) -> None:
    """Until the scheduler holds no task (the previous compute's keys are released)."""
    deadline = time.monotonic() + timeout
    while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) and time.monotonic() < deadline:
        time.sleep(0.05)


def _profile_seconds(client: Any) -> float:
    """Seconds the workers' statistical profilers have spent sampling so far."""
    def spent(dask_worker: Any) -> float:
        return float(dask_worker.digests_total.get("profile-duration", 0.0))
    return sum(client.run(spent).values())


def write_parquet(path: Path, prompts: list[list[int]], partitions: int) -> Path:
    """The rows as a parquet dataset of `partitions` files (token ids as an int32 list column)."""
    import pyarrow.parquet as pq
    path.mkdir(parents=True, exist_ok=True)
    size = -(-len(prompts) // partitions)
    for i in range(0, len(prompts), size):
        table = pa.table({"prompt": pa.array(prompts[i:i + size], type=pa.list_(pa.int32()))})
        pq.write_table(table, path / f"part.{i // size:04d}.parquet")
    return path


def _fmt(seconds: list[float]) -> str:
    return "[" + ", ".join(f"{s:.2f}" for s in seconds) + "] s"


def _device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="shared-instructions", choices=sorted(WORKLOADS))
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--input-partitions", type=int, default=8, help="partitions of the input dataframe")
    ap.add_argument("--npartitions", type=int, default=None, help="output partitions (default: one per GPU worker)")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (medians are reported)")
    ap.add_argument("--sources", default="parquet,memory", help="where the Dask runs read the rows from")
    ap.add_argument("--kv-cache-gib", type=float, default=24.0,
                    help="each engine's KV pool on the GPU (both engines are loaded at once)")
    ap.add_argument("--keep-profiler", action="store_true",
                    help="leave the worker's profiler sampling while the engine runs (batchllm.pause-worker-profiler off)")
    ap.add_argument("--tiny", action="store_true", help="CPU check: tiny model, tiny workload, fp32")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the json report")
    args = ap.parse_args(argv)

    workload, vocab = args.workload, None
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        if args.tiny:
            workload, vocab = TINY_WORKLOAD if args.workload == "shared-instructions" else args.workload, 512
            model = save_tiny_checkpoint(Path(tmp) / "tiny", vocab)
            engine_options: dict[str, Any] = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 64 << 20}
        else:
            from ..roofline import SHAPES
            vocab = SHAPES[args.shape].vocab
            t = time.perf_counter()
            model = save_random_checkpoint(Path(tmp) / args.shape, args.shape)
            print(f"checkpoint {args.shape} written in {time.perf_counter() - t:.1f} s", flush=True)
            engine_options = {"dtype": "bfloat16", "device": "cuda", "kv_cache_bytes": int(args.kv_cache_gib * 2**30)}
        reqs = make_workload(workload, vocab_size=vocab, scale=args.scale)
        prompts = [r.prompt_token_ids for r in reqs]
        max_tokens = reqs[0].max_tokens
        shape = summary(reqs)
        print(f"{workload} scale {args.scale}: {shape}", flush=True)
        parquet = write_parquet(Path(tmp) / "rows.parquet", prompts, args.input_partitions)
        sources = {s: {"parquet": parquet, "memory": None}[s] for s in args.sources.split(",")}
        runs = run_paired(str(model), prompts, max_tokens, engine_options, gpu=not args.tiny, sources=sources,
                          input_partitions=args.input_partitions, npartitions=args.npartitions,
                          repeats=args.repeats, pause_profiler=not args.keep_profiler)

    out_tokens = shape["output_tokens"]
    direct = runs.pop("direct")
    print(f"direct: median {direct['seconds']:.2f} s of {_fmt(direct['all_seconds'])}", flush=True)
    for source, run in runs.items():
        print(f"dask from {source}: median {run['seconds']:.2f} s of {_fmt(run['all_seconds'])}; the worker's "
              f"Engine.generate took {_fmt(run['engine_seconds'])}, the rest {_fmt(run['rest_seconds'])}, its "
              f"profiler sampled {_fmt(run['profiler_seconds'])}")
        print(f"  direct/dask per pair {', '.join(f'{r:.3f}' for r in run['pair_ratios'])}: median {run['ratio']:.3f}  "
              f"within 10%: {run['within_10_percent']}   worker engine / direct {run['worker_engine_over_direct']:.3f}  "
              f"complete: {direct['complete'] and run['complete']}")
    report = {
        "workload": workload, "scale": args.scale, "model": "tiny" if args.tiny else args.shape,
        "requests": shape["requests"], "prompt_tokens": shape["prompt_tokens"], "output_tokens": out_tokens,
        "engine_options": engine_options, "pause_worker_profiler": not args.keep_profiler,
        "device": _device_name(), "direct": {**direct, "tokens_per_s": out_tokens / direct["seconds"]},
        "dask": {s: {**r, "tokens_per_s": out_tokens / r["seconds"]} for s, r in runs.items()},
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"bench_dask_{workload}_{args.scale:g}{'_profiler' if args.keep_profiler else ''}.json"
    (Path(args.out) / name).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
