"""`batchllm-dask`: generate completions for a parquet file, run the demo, or the benchmark.

    batchllm-dask generate rows.parquet answers.parquet --prompt-col prompt --model /models/llama --max-tokens 64
    batchllm-dask demo             # the embedded tiny model, no GPU, no download
    batchllm-dask bench [ARGS...]  # batchllm_dask.bench.dask_layer

`generate` runs on Dask's local scheduler by default, on a distributed
cluster with `--scheduler ADDRESS`, or on a fresh local one with `--workers N`
(`--gpu-workers` starts dask_cuda.LocalCUDACluster: one worker per GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from typing import Any, Iterator

_SAMPLING = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int}
_ENGINE = {"dtype": str, "device": str, "kv_cache_bytes": int, "page_size": int, "max_num_batched_tokens": int,
           "max_num_seqs": int, "min_shared_tokens": int}


def _add_options(p: argparse.ArgumentParser) -> None:
    for name, kind in {**_SAMPLING, **_ENGINE}.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, dest=name)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None)
    p.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false", default=None)
    p.add_argument("--progress", action="store_true", default=None, help="a tqdm bar per partition")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    names = [*_SAMPLING, *_ENGINE, "stop", "ignore_eos", "prefix_sharing", "progress"]
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="batchllm-dask", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="completions of a parquet dataset's prompt column, to parquet")
    g.add_argument("input")
    g.add_argument("output")
    g.add_argument("--prompt-col", default="prompt")
    g.add_argument("--output-col", default="completion")
    g.add_argument("--model", required=True, help="a local Hugging Face checkpoint directory")
    g.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    g.add_argument("--npartitions", type=int, default=None)
    g.add_argument("--scheduler", default=None, help="address of a running distributed scheduler")
    g.add_argument("--workers", type=int, default=0, help="start a LocalCluster of this many processes")
    g.add_argument("--gpu-workers", action="store_true", help="start dask_cuda.LocalCUDACluster instead")
    _add_options(g)
    d = sub.add_parser("demo", help="a small dataframe through ddf.llm.generate on the embedded tiny model")
    d.add_argument("--rows", type=int, default=64)
    d.add_argument("--max-tokens", type=int, default=16)
    d.add_argument("--npartitions", type=int, default=4)
    sub.add_parser("bench", help="the Dask-layer benchmark (batchllm_dask.bench.dask_layer) with the arguments that follow")
    return ap


@contextlib.contextmanager
def _cluster(args: argparse.Namespace) -> Iterator[Any]:
    """A distributed client as the command line asks, else None (Dask's local scheduler)."""
    if not (args.scheduler or args.workers or args.gpu_workers):
        yield None
        return
    from distributed import Client, LocalCluster
    if args.scheduler:
        with Client(args.scheduler) as client:
            yield client
        return
    if args.gpu_workers:
        from dask_cuda import LocalCUDACluster
        cluster = LocalCUDACluster(resources={"GPU": 1})  # one worker per GPU
    else:
        cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True)
    with cluster, Client(cluster) as client:
        yield client


def cmd_generate(args: argparse.Namespace) -> int:
    import dask.dataframe as dd

    from . import gpu_resources
    with _cluster(args):
        ddf = dd.read_parquet(args.input)
        out = ddf.llm.generate(args.prompt_col, args.model, output_col=args.output_col, chat=args.chat,
                               npartitions=args.npartitions, **_options(args))
        start = time.perf_counter()
        with gpu_resources():
            out.to_parquet(args.output)
        seconds = time.perf_counter() - start
    done = dd.read_parquet(args.output, columns=["completion_tokens", "finish_reason"]).compute()
    print(f"{len(done)} rows, {int(done.completion_tokens.sum())} tokens in {seconds:.1f} s "
          f"({done.completion_tokens.sum() / seconds:.1f} tokens/s); errors: {(done.finish_reason == 'error').sum()}")
    return 0


def demo_frame(rows: int) -> Any:
    """Product-review prompts behind one shared instruction block: the workload prefix sharing is for."""
    import pandas as pd
    instructions = ("You label product reviews. Answer with one word, positive or negative, "
                    "then a short reason. Be consistent across reviews.\n\n")
    products = ["kettle", "lamp", "backpack", "headphones", "desk chair", "umbrella", "blender", "tent"]
    moods = ["loved it", "broke after a week", "works as described", "too loud", "great value", "arrived late"]
    reviews = [f"The {products[i % len(products)]} {moods[i % len(moods)]} (order {i})." for i in range(rows)]
    return pd.DataFrame({"review": reviews, "prompt": [instructions + "Review: " + r + "\nLabel:" for r in reviews]})


def cmd_demo(args: argparse.Namespace) -> int:
    import dask.dataframe as dd
    import pandas as pd

    from .engine.default_model import default_model_path
    model = default_model_path()
    ddf = dd.from_pandas(demo_frame(args.rows), npartitions=args.npartitions)
    out = ddf.llm.generate("prompt", str(model), max_tokens=args.max_tokens, temperature=0.0)
    start = time.perf_counter()
    result = out.compute().sort_index()
    seconds = time.perf_counter() - start
    with pd.option_context("display.max_colwidth", 36, "display.width", 160, "display.max_columns", 8):
        print(result[["review", "completion", "prompt_tokens", "completion_tokens", "finish_reason"]].head(8))
    tokens = int(result.completion_tokens.sum())
    print(f"\n{len(result)} rows through ddf.llm.generate on {model.name} ({ddf.npartitions} partitions): "
          f"{tokens} tokens in {seconds:.2f} s (model load included), {tokens / seconds:.1f} tokens/s, "
          f"{len(result) / seconds:.1f} rows/s")
    return 0


def cmd_bench(rest: list[str]) -> int:
    from .bench.dask_layer import main as bench_main
    bench_main(rest)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark's own parser
        return cmd_bench(argv[1:])
    args = parser().parse_args(argv)
    return {"generate": cmd_generate, "demo": cmd_demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
