"""Issue 15, CPU: jump-forward's host time a step, forced runs computed for every row against reused by state.

N requests of one schema go through `GrammarMatchers` in the engine's order (jump_forward, fill_mask, sample,
accept) over bench.structured's 128256-token BPE; the step's "sample" picks, among the allowed tokens, either
uniformly (`uniform`: every request wanders its own way, the fewest shared states) or the one of highest
score, a fixed random score per token plus per-request noise (`preferred`: a model's habits, as a real model's
greedy choices are).  The same walk twice: `GrammarCompiler.reuse_by_state` off (llguidance's
`compute_ff_tokens` for every forced row, a mask for every row) and on (once per state, TokenHistories).  Prints host ms in
jump_forward (sum over the walk, and per step), the forced-run computations and reuses, and fill_mask and
accept ms beside them.

    PYTHONPATH=. python benchmarks/structured_masks_jump.py --tokenizer DIR [--requests 256 1024]
(DIR: bench.structured.train_tokenizer(128256, 48 << 20) saved; without it, one is trained, 25 s.)
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from batchllm_dask.bench.structured import SCHEMAS, train_tokenizer
from batchllm_dask.engine import SamplingParams
from batchllm_dask.engine.structured import GrammarCompiler, GrammarMatchers
from benchmarks.structured_masks import VOCAB


def allowed_of(mask_row: np.ndarray) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(mask_row.view(np.uint8), bitorder="little"))


def walk(compiler: GrammarCompiler, schema: dict, requests: int, mode: str, max_tokens: int = 200) -> dict:
    params = {rid: SamplingParams(json_schema=schema) for rid in range(requests)}
    matchers: GrammarMatchers = compiler.start(params)
    rng = np.random.default_rng(0)
    scores = rng.standard_normal(VOCAB) * 3
    seconds = {"jump_forward": 0.0, "fill_mask": 0.0, "accept": 0.0}
    alive, steps = list(params), 0
    while alive and steps < max_tokens:
        start = time.perf_counter()
        runs = matchers.jump_forward([(rid, 1000, frozenset()) for rid in alive])
        seconds["jump_forward"] += time.perf_counter() - start
        start = time.perf_counter()
        mask = matchers.fill_mask(alive).numpy()
        seconds["fill_mask"] += time.perf_counter() - start
        picks = []
        for row, rid in enumerate(alive):
            if rid in runs:
                picks.append(runs[rid][0])
                continue
            options = allowed_of(mask[row])
            if mode == "uniform":
                picks.append(int(rng.choice(options)))
            else:
                picks.append(int(options[np.argmax(scores[options] + rng.gumbel(size=len(options)))]))
        start = time.perf_counter()
        ended = set(matchers.accept(alive, picks))
        seconds["accept"] += time.perf_counter() - start
        matchers.release(list(ended))
        alive = [rid for rid in alive if rid not in ended]
        steps += 1
    return {"steps": steps, **{f"{k}_ms": round(1e3 * v, 1) for k, v in seconds.items()},
            "jump_forward_ms_per_step": round(1e3 * seconds["jump_forward"] / steps, 2),
            "states_asked_anew": matchers.forced_runs_computed, "states_reused": matchers.forced_runs_reused,
            "masks_computed": matchers.masks_computed, "tokens_jumped": matchers.tokens_jumped}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--schema", choices=sorted(SCHEMAS), nargs="+", default=["classify", "review"])
    ap.add_argument("--mode", choices=["uniform", "preferred"], nargs="+", default=["uniform", "preferred"])
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--corpus-mb", type=int, default=48)
    args = ap.parse_args()
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = train_tokenizer(VOCAB, args.corpus_mb << 20)
    compiler = GrammarCompiler(tokenizer, VOCAB, [tokenizer.eos_token_id])
    compiler.tokenizer  # built once, outside the timings
    for schema in args.schema:
        for mode in args.mode:
            for n in args.requests:
                for reuse in (False, True):
                    compiler.reuse_by_state = reuse
                    row = walk(compiler, SCHEMAS[schema], n, mode)
                    print(json.dumps({"schema": schema, "mode": mode, "requests": n, "reuse": reuse, **row}),
                          flush=True)


if __name__ == "__main__":
    main()
