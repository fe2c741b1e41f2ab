"""ETL: product reviews in parquet -> an LLM labels each one -> answers in parquet.

    python examples/etl_reviews.py                       # embedded tiny model, Dask's local scheduler
    python examples/etl_reviews.py --model /models/llama-3.2-1b --rows 100000 --workers 8

Every prompt is [shared instruction block with few-shot examples][one review]:
the instruction block is computed once per partition by the engine, and the
planner keeps the rows that share it together, so the many rows cost little
more than their own few tokens.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd

import batchllm_dask

INSTRUCTIONS = """You are a careful analyst of customer feedback for an online shop.
For each review, answer with one word, positive, negative or mixed, then one short reason.

Review: The kettle boils fast and looks great on the counter.
Answer: positive, it works well and looks good.

Review: The zipper broke on the second day and support never replied.
Answer: negative, it broke quickly and support failed.

Review: Comfortable chair, but the armrests wobble.
Answer: mixed, comfortable with a build flaw.

"""
PRODUCTS = ["kettle", "desk lamp", "backpack", "headphones", "office chair", "umbrella", "blender", "tent"]
OPINIONS = ["works exactly as described", "stopped working after a week", "is much louder than expected",
            "was a great value for the price", "arrived late and scratched", "is sturdy and well made",
            "has a confusing manual", "exceeded my expectations"]


def make_reviews(path: Path, rows: int, seed: int = 0) -> Path:
    """A parquet file of synthetic product reviews, indexed by review_id."""
    rng = np.random.default_rng(seed)
    product = rng.choice(PRODUCTS, rows)
    opinion = rng.choice(OPINIONS, rows)
    df = pd.DataFrame({
        "product": product,
        "stars": rng.integers(1, 6, rows),
        "review": [f"The {p} {o}." for p, o in zip(product, opinion)],
    }, index=pd.Index(np.arange(rows) + 1000, name="review_id"))
    df.to_parquet(path)
    return path


def add_prompts(reviews: dd.DataFrame) -> dd.DataFrame:
    """The prompt column: the shared instruction block, then the row's review."""
    return reviews.assign(prompt=INSTRUCTIONS + "Review: " + reviews["review"] + "\nAnswer:")


def run(model: str, reviews_path: Path, answers_path: Path, max_tokens: int = 16,
        npartitions: int | None = None) -> dd.DataFrame:
    """Read reviews, generate the answers, write them; returns the answers (lazily, read back)."""
    reviews = dd.read_parquet(reviews_path)
    answers = add_prompts(reviews).llm.generate("prompt", model, max_tokens=max_tokens, temperature=0.0,
                                                npartitions=npartitions)
    with batchllm_dask.gpu_resources():  # a no-op unless the cluster's workers declare GPUs
        answers.drop(columns=["prompt"]).to_parquet(answers_path)
    return dd.read_parquet(answers_path)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--npartitions", type=int, default=None)
    ap.add_argument("--workers", type=int, default=0, help="run on a LocalCluster of this many processes")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    model = args.model or str(batchllm_dask.default_model_path())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="etl-reviews-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.workers:
            from distributed import Client, LocalCluster
            cluster = stack.enter_context(LocalCluster(n_workers=args.workers, threads_per_worker=1))
            stack.enter_context(Client(cluster))
        start = time.perf_counter()
        reviews = make_reviews(workdir / "reviews.parquet", args.rows)
        answers = run(model, reviews, workdir / "answers.parquet", args.max_tokens, args.npartitions).compute()
        seconds = time.perf_counter() - start
    print(answers.sort_index()[["product", "stars", "completion", "finish_reason"]].head())
    print(f"{len(answers)} reviews labelled in {seconds:.1f} s -> {workdir / 'answers.parquet'}")
    return workdir / "answers.parquet"


if __name__ == "__main__":
    main()
