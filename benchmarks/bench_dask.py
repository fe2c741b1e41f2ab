"""What the Dask layer costs: one workload through `Engine.generate` directly, then through `ddf.llm.generate`.

Both runs see the same token-id requests (workloads.py), greedy, EOS ignored,
and are timed after a warm-up that loads the engine (in this process for the
direct run, in the worker for the Dask run).  The Dask run goes through the
whole path: planning (prefix statistics, global plan), the shuffle, the
partition runner on a LocalCluster of one GPU worker (threads_per_worker=1,
resources GPU=1, computed inside `batchllm_dask.gpu_resources()`), and the
results back to the client.  The target: Dask throughput within 10% of direct.

On the device (after `source benchmarks/device_setup.sh`):
    PYTHONUNBUFFERED=1 python benchmarks/bench_dask.py --scale 0.25
On a CPU, to check the script itself (tiny model, tiny workload, seconds):
    python benchmarks/bench_dask.py --tiny
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import WORKLOADS, make_workload, summary  # noqa: E402

TINY_WORKLOAD = "tiny-shared-instructions"
WORKLOADS.setdefault(TINY_WORKLOAD, dataclasses.replace(
    WORKLOADS["shared-instructions"], n_systems=4, system_len=(96, 96), question_len=(8, 24), output_len=6,
    description="4 instruction prefixes of 96 tokens x rows of 8-24 tokens, 6 out (script check)"))


def save_random_checkpoint(path: Path, shape: str = "llama-1b", device: str = "cuda") -> Path:
    """A random-weight bf16 checkpoint of a roofline.SHAPES shape, with the embedded byte tokenizer.

    The requests are token ids, so the tokenizer only has to load; EOS is ignored.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from batchllm_dask.engine.default_model import build_tokenizer
    from roofline import SHAPES

    s = SHAPES[shape]
    config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                         num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                         head_dim=s.head_dim, max_position_embeddings=8192, tie_word_embeddings=shape == "llama-1b")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def save_tiny_checkpoint(path: Path, vocab: int) -> Path:
    from batchllm_dask.engine.default_model import build_tiny_checkpoint
    return build_tiny_checkpoint(path, arch="llama", vocab_size=vocab)


def run_direct(model: str, prompts: list[list[int]], max_tokens: int, engine_options: dict,
               repeats: int = 1) -> dict:
    """Engine.generate on every prompt at once, after a warm-up call on all of them (it captures every
    CUDA graph the timed calls replay), `repeats` times (median kept); the engine is released after."""
    from batchllm_dask.engine import Engine, SamplingParams

    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    engine = Engine(model, **engine_options)
    engine.generate(prompts, sampling)
    times = []
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        outs = engine.generate(prompts, sampling)
        _sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = [list(o.token_ids) for o in outs]
    del engine, outs
    _free()
    return {"seconds": seconds, "all_seconds": times, "tokens": tokens}


def run_dask(model: str, prompts: list[list[int]], max_tokens: int, engine_options: dict,
             gpu: bool, input_partitions: int, npartitions: int | None, repeats: int = 1,
             parquet: Path | None = None, pause_profiler: bool = True) -> dict:
    """ddf.llm.generate on a LocalCluster of one worker, after a warm-up compute of the same graph (it loads
    the worker's engine and captures its CUDA graphs), `repeats` times (median kept), with the worker's own
    Engine.generate time of each run and the time its profiler spent sampling.

    The rows come from `dd.from_pandas` (the client's memory, shipped inside the graph) or, given
    `parquet`, from `dd.read_parquet` of the same rows written there (read by the worker, as in a pipeline)."""
    import dask
    import dask.dataframe as dd
    from distributed import Client, LocalCluster

    import batchllm_dask
    from batchllm_dask.worker import PAUSE_PROFILER, engine_stats

    frame = pd.DataFrame({"prompt": pd.Series(prompts, dtype=pd.ArrowDtype(pa.list_(pa.int32())))})
    # npartitions None: the default, one output partition per GPU worker (here one).
    options = dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, npartitions=npartitions, **engine_options)
    resources = {"GPU": 1} if gpu else None
    with dask.config.set({PAUSE_PROFILER: pause_profiler}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True, resources=resources,
                         dashboard_address=None) as cluster, Client(cluster) as client:
        ddf = dd.read_parquet(parquet) if parquet else dd.from_pandas(frame, npartitions=input_partitions)
        out = ddf.llm.generate("prompt", model, **options)
        partitions = out.npartitions
        with batchllm_dask.gpu_resources() as annotated:
            out.compute()  # warm-up
        times, engine_times, profiling = [], [], []
        for _ in range(repeats):
            _wait_until_released(client)  # else the scheduler may still hold the last run's result
            sampled = _profile_seconds(client)
            start = time.perf_counter()
            with batchllm_dask.gpu_resources():
                result = out.compute()
            times.append(time.perf_counter() - start)
            engine_times.append(sum(s.seconds for s in client.run(engine_stats).values() if s is not None))
            profiling.append(_profile_seconds(client) - sampled)
        loads = sum(client.run(batchllm_dask.engine_loads).values())
    result = result.sort_index()
    return {"seconds": statistics.median(times), "all_seconds": times, "engine_seconds": engine_times,
            "overhead_seconds": [t - e for t, e in zip(times, engine_times)], "profiler_seconds": profiling,
            "annotated": annotated, "engine_loads": loads, "partitions": partitions,
            "completion_tokens": result["completion_tokens"].tolist(),
            "errors": int((result.finish_reason == "error").sum())}


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


def _sync() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _device_name() -> str:
    import torch
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _free() -> None:
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="shared-instructions", choices=sorted(WORKLOADS))
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--shape", default="llama-1b")
    ap.add_argument("--input-partitions", type=int, default=8, help="partitions of the input dataframe")
    ap.add_argument("--npartitions", type=int, default=None, help="output partitions (default: one per GPU worker)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path (the median is reported)")
    ap.add_argument("--sources", default="parquet,memory", help="where the Dask runs read the rows from")
    ap.add_argument("--keep-profiler", action="store_true",
                    help="leave the worker's profiler sampling while the engine runs (batchllm.pause-worker-profiler off)")
    ap.add_argument("--tiny", action="store_true", help="CPU check: tiny model, tiny workload, fp32")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_dask.json")
    args = ap.parse_args(argv)

    workload, vocab = args.workload, None
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        if args.tiny:
            workload, vocab = TINY_WORKLOAD if args.workload == "shared-instructions" else args.workload, 512
            model = save_tiny_checkpoint(Path(tmp) / "tiny", vocab)
            engine_options: dict[str, Any] = {"dtype": "float32", "device": "cpu", "kv_cache_bytes": 64 << 20}
        else:
            from roofline import SHAPES
            vocab = SHAPES[args.shape].vocab
            t = time.perf_counter()
            model = save_random_checkpoint(Path(tmp) / args.shape, args.shape)
            print(f"checkpoint {args.shape} written in {time.perf_counter() - t:.1f} s", flush=True)
            engine_options = {"dtype": "bfloat16", "device": "cuda"}
        reqs = make_workload(workload, vocab_size=vocab, scale=args.scale)
        prompts = [r.prompt_token_ids for r in reqs]
        max_tokens = reqs[0].max_tokens
        shape = summary(reqs)
        print(f"{workload} scale {args.scale}: {shape}", flush=True)
        direct = run_direct(str(model), prompts, max_tokens, engine_options, args.repeats)
        print(f"direct: median {direct['seconds']:.2f} s of {_fmt(direct['all_seconds'])}", flush=True)
        parquet = write_parquet(Path(tmp) / "rows.parquet", prompts, args.input_partitions)
        runs = {}
        sources = {"parquet": parquet, "memory": None}
        for source in args.sources.split(","):
            runs[source] = run_dask(str(model), prompts, max_tokens, engine_options, gpu=not args.tiny,
                                    input_partitions=args.input_partitions, npartitions=args.npartitions,
                                    repeats=args.repeats, parquet=sources[source],
                                    pause_profiler=not args.keep_profiler)
            print(f"dask from {source}: median {runs[source]['seconds']:.2f} s of "
                  f"{_fmt(runs[source]['all_seconds'])}; the worker's Engine.generate took "
                  f"{_fmt(runs[source]['engine_seconds'])}, the rest {_fmt(runs[source]['overhead_seconds'])}, "
                  f"its profiler sampled for {_fmt(runs[source]['profiler_seconds'])}", flush=True)
        dask_run = runs[args.sources.split(",")[0]]  # parquet first: the dd.read_parquet(...).llm.generate

    out_tokens = shape["output_tokens"]
    direct_complete = all(len(t) == max_tokens for t in direct["tokens"])
    report = {
        "workload": workload, "scale": args.scale, "model": "tiny" if args.tiny else args.shape,
        "requests": shape["requests"], "prompt_tokens": shape["prompt_tokens"], "output_tokens": out_tokens,
        "pause_worker_profiler": not args.keep_profiler, "device": _device_name(),
        "direct": {"seconds": direct["seconds"], "all_seconds": direct["all_seconds"],
                   "tokens_per_s": out_tokens / direct["seconds"], "complete": direct_complete},
        "dask": {},
    }
    for source, run in runs.items():
        complete = run["errors"] == 0 and all(n == max_tokens for n in run["completion_tokens"])
        ratio = direct["seconds"] / run["seconds"]  # throughput of Dask over throughput of direct
        report["dask"][source] = {
            **{k: run[k] for k in ("seconds", "all_seconds", "engine_seconds", "overhead_seconds",
                                   "profiler_seconds", "annotated", "engine_loads", "partitions")},
            "tokens_per_s": out_tokens / run["seconds"], "ratio": ratio, "within_10_percent": ratio >= 0.9,
            "complete": complete}
        print(f"{source}: direct {out_tokens / direct['seconds']:,.0f} tok/s   dask {out_tokens / run['seconds']:,.0f} "
              f"tok/s   ratio {ratio:.3f}   within 10%: {ratio >= 0.9}   complete: {direct_complete and complete}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = f"bench_dask_{workload}_{args.scale:g}{'_profiler' if args.keep_profiler else ''}.json"
    (Path(args.out) / name).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
