"""ETL on Spark: product reviews in parquet -> an LLM labels each one -> answers in parquet.

    python examples/spark_reviews.py                      # embedded tiny model, local[2]
    python examples/spark_reviews.py --model /models/llama-3.2-1b --rows 100000 --master local[8]
    spark-submit --conf spark.executor.resource.gpu.amount=1 --conf spark.task.resource.gpu.amount=1 \\
        examples/spark_reviews.py --model /models/llama-3.2-1b --device cuda --master yarn

The Spark twin of etl_reviews.py (same reviews, same prompt): every prompt is [shared instruction block
with few-shot examples][one review], the planner keeps the rows that share the block in one task, and
the engine computes the block once there.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

import batchllm_dask
from batchllm_dask.spark import generate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from etl_reviews import INSTRUCTIONS, make_reviews  # noqa: E402 - the Dask example's data and prompt


def add_prompts(reviews: DataFrame) -> DataFrame:
    """The prompt column: the shared instruction block, then the row's review."""
    return reviews.withColumn("prompt", F.concat(F.lit(INSTRUCTIONS + "Review: "), "review", F.lit("\nAnswer:")))


def run(spark: SparkSession, model: str, reviews_path: Path, answers_path: Path, max_tokens: int = 16,
        npartitions: int | None = None, device: str = "cpu") -> DataFrame:
    """Read reviews, generate the answers, write them (one file per task); returns the answers read back."""
    reviews = spark.read.parquet(str(reviews_path))
    answers = generate(add_prompts(reviews), "prompt", model, max_tokens=max_tokens, temperature=0.0,
                       npartitions=npartitions, key_col="review_id", device=device)
    answers.drop("prompt").write.mode("overwrite").parquet(str(answers_path))
    return spark.read.parquet(str(answers_path))


def session(master: str) -> tuple[SparkSession, bool]:
    """The running Spark session, else a new one on `master`; and whether this script started it."""
    active = SparkSession.getActiveSession()
    if active is not None:
        return active, False
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    spark = (SparkSession.builder.master(master).appName("spark-reviews")
             .config("spark.sql.shuffle.partitions", "8").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark, True


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--npartitions", type=int, default=None)
    ap.add_argument("--master", default="local[2]", help="Spark master when no session is running")
    ap.add_argument("--device", default="cpu", help="the engine's device (cuda on GPU executors)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args(argv)
    model = args.model or str(batchllm_dask.default_model_path())
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="spark-reviews-"))
    workdir.mkdir(parents=True, exist_ok=True)
    spark, started = session(args.master)
    try:
        start = time.perf_counter()
        reviews = make_reviews(workdir / "reviews.parquet", args.rows)
        answers = run(spark, model, reviews, workdir / "answers", args.max_tokens, args.npartitions,
                      args.device).toPandas()
        seconds = time.perf_counter() - start
    finally:
        if started:
            spark.stop()
    print(answers.sort_values("review_id")[["review_id", "product", "stars", "completion", "finish_reason"]].head())
    print(f"{len(answers)} reviews labelled in {seconds:.1f} s -> {workdir / 'answers'}")
    return workdir / "answers"


if __name__ == "__main__":
    main()
