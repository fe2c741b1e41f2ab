"""Where structured output's mask time goes (issue 15), on the CPU, without a model.

N llguidance matchers of bench.structured's SCHEMA walk random allowed tokens of a 128256-token
byte-level BPE (bench.structured.train_tokenizer, or --tokenizer DIR).  Two measurements:

1. positions: each mask timed alone (one thread), by how many tokens it allows: 1 (the grammar
   forces the token), a few (<= 64: an integer, an enum, a separator choice) or many (a string's
   interior); with the schema as it is and without its maxLength bounds.
2. steps: the engine's way, all rows of a step through llguidance's LLExecutor, against first asking
   each row's `compute_ff_tokens` and computing full masks only for the rows it leaves (the
   forced-token shortcut): host ms a step and masks computed per token.

    PYTHONPATH=. python benchmarks/structured_masks.py [--requests 32] [--tokenizer DIR]
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import time

import numpy as np

from batchllm_dask.bench.structured import SCHEMA, train_tokenizer
from batchllm_dask.engine import constraints

VOCAB = 128256
WORDS = (VOCAB + 31) // 32


def unbounded(schema: dict) -> dict:
    """SCHEMA without its maxLength bounds (the strings' lengths free)."""
    out = copy.deepcopy(schema)
    for prop in ("name", "summary"):
        out["properties"][prop].pop("maxLength")
    out["properties"]["tags"]["items"].pop("maxLength")
    return out


def template(lltok, schema: dict):
    import llguidance
    grammar = constraints.grammar_of("json_schema", json.dumps(schema, separators=(",", ":")))
    return llguidance.LLMatcher(lltok, grammar, log_level=0)


def load_tokenizer(path: str | None, corpus_mb: int = 48):
    """llguidance's tokenizer of a Hugging Face tokenizer folder, or of bench.structured's trained BPE."""
    import llguidance.hf
    if path:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        tokenizer = train_tokenizer(VOCAB, corpus_mb << 20)
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB, eos_token=[tokenizer.eos_token_id])


def allowed_tokens(row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))


def positions(lltok, schema: dict, requests: int, limit: int = 200) -> dict:
    """Per-mask microseconds (median) and share of all mask time, by kind of position."""
    tmpl, rng, row = template(lltok, schema), random.Random(0), np.zeros(WORDS, dtype=np.int32)
    kinds: dict[str, list[float]] = {"forced": [], "few": [], "many": []}
    for _ in range(requests):
        matcher = tmpl.deep_copy()
        for _ in range(limit):
            if matcher.is_stopped():
                break
            start = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(row.ctypes.data, WORDS * 4)
            seconds = time.perf_counter() - start
            allowed = allowed_tokens(row)
            kinds["forced" if len(allowed) == 1 else "few" if len(allowed) <= 64 else "many"].append(seconds)
            assert matcher.consume_token(int(rng.choice(allowed)))
    total = sum(map(sum, kinds.values()))
    return {k: {"masks": len(v), "median_us": round(1e6 * statistics.median(v), 1) if v else None,
                "share_of_time": round(sum(v) / total, 3)} for k, v in kinds.items()}


def steps(lltok, executor, schema: dict, requests: int, forced_first: bool, limit: int = 150) -> dict:
    """Host ms a step over `requests` rows walking random allowed tokens, and masks per token."""
    tmpl, rng = template(lltok, schema), random.Random(0)
    matchers = [tmpl.deep_copy() for _ in range(requests)]
    mask = np.zeros((requests, WORDS), dtype=np.int32)
    seconds, masks, tokens, count = [], 0, 0, 0
    while (live := [i for i, m in enumerate(matchers) if not m.is_stopped()]) and count < limit:
        count += 1
        start = time.perf_counter()
        rows = []
        for i in live:
            forced = matchers[i].compute_ff_tokens() if forced_first else []
            if forced:
                mask[i] = 0
                mask[i].view(np.uint32)[forced[0] // 32] = np.uint32(1 << (forced[0] % 32))
            else:
                rows.append((matchers[i], i))
        if rows:
            executor.unsafe_compute_mask_ptr(rows, mask.ctypes.data, WORDS * 4, requests)
        seconds.append(time.perf_counter() - start)
        masks += len(rows)
        for i in live:
            assert matchers[i].consume_token(int(rng.choice(allowed_tokens(mask[i]))))
            tokens += 1
    return {"steps": count, "tokens": tokens, "masks_per_token": round(masks / tokens, 3),
            "ms_per_step_median": round(1e3 * statistics.median(seconds), 2),
            "ms_per_step_mean": round(1e3 * statistics.mean(seconds), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer folder (default: train one)")
    ap.add_argument("--corpus-mb", type=int, default=48)
    args = ap.parse_args()
    import llguidance
    import llguidance.hf
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = train_tokenizer(VOCAB, args.corpus_mb << 20)
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB, eos_token=[tokenizer.eos_token_id])
    executor = llguidance.LLExecutor()
    print(f"tokenizer: {len(tokenizer)} tokens for {VOCAB} ids; {args.requests} requests")
    for name, schema in (("SCHEMA", SCHEMA), ("SCHEMA without maxLength", unbounded(SCHEMA))):
        print(name, "positions:", json.dumps(positions(lltok, schema, args.requests)))
        for forced_first in (False, True):
            print(name, "steps, forced-token shortcut" if forced_first else "steps, a full mask per row", ":",
                  json.dumps(steps(lltok, executor, schema, args.requests, forced_first)))


if __name__ == "__main__":
    main()
