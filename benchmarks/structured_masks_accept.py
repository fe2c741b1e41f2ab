"""Issue 15, CPU: a step's `accept` one matcher at a time (consume_token) against llguidance's thread pool
(LLExecutor.consume_token_par), host ms a step, for N matchers walking random allowed tokens.

Two sets of N matchers of one schema walk the same tokens in lockstep (masks from the first set, not
timed): the first consumes serially, as `GrammarMatchers.accept` did, the second through the executor, as it
does now; each then asks `is_stopped`, as `accept` does.  The two orders alternate step by step.

    PYTHONPATH=. python benchmarks/structured_masks_accept.py --tokenizer DIR [--requests 64 128 256 512]
(DIR: bench.structured.train_tokenizer(128256, 48 << 20) saved; without it, one is trained, 25 s.)
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import numpy as np

from batchllm_dask.bench.structured import SCHEMAS
from benchmarks.structured_masks import VOCAB, WORDS, allowed_tokens, load_tokenizer, template


def serial(matchers: list, tokens: list[int]) -> list[bool]:
    return [not m.consume_token(t) or m.is_stopped() for m, t in zip(matchers, tokens)]


def parallel(executor, matchers: list, tokens: list[int]) -> list[bool]:
    accepted = executor.consume_token_par(list(zip(matchers, tokens)))
    return [not ok or m.is_stopped() for m, ok in zip(matchers, accepted)]


def walk(lltok, executor, schema: dict, requests: int, limit: int = 150, seed: int = 0) -> dict:
    tmpl, rng = template(lltok, schema), random.Random(seed)
    one = [tmpl.deep_copy() for _ in range(requests)]
    two = [tmpl.deep_copy() for _ in range(requests)]
    mask = np.zeros((requests, WORDS), dtype=np.int32)
    times: dict[str, list[float]] = {"serial": [], "parallel": []}
    step = 0
    while (live := [i for i, m in enumerate(one) if not m.is_stopped()]) and step < limit:
        executor.unsafe_compute_mask_ptr([(one[i], i) for i in live], mask.ctypes.data, WORDS * 4, requests)
        tokens = [int(rng.choice(allowed_tokens(mask[i]))) for i in live]
        a, b = [one[i] for i in live], [two[i] for i in live]
        for name in (("serial", "parallel") if step % 2 == 0 else ("parallel", "serial")):
            start = time.perf_counter()
            ended = serial(a, tokens) if name == "serial" else parallel(executor, b, tokens)
            times[name].append(time.perf_counter() - start)
            assert not any(m.is_error() for m in (a if name == "serial" else b)), ended
        step += 1
    out = {"steps": step}
    for name, values in times.items():
        out[f"{name}_ms_median"] = round(1e3 * statistics.median(values), 3)
        out[f"{name}_ms_total"] = round(1e3 * sum(values), 1)
    out["speedup_total"] = round(out["serial_ms_total"] / out["parallel_ms_total"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--schema", choices=sorted(SCHEMAS), nargs="+", default=["classify", "review"])
    ap.add_argument("--threads", type=int, default=None, help="LLExecutor threads (default: llguidance's)")
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--corpus-mb", type=int, default=48)
    args = ap.parse_args()
    import llguidance
    lltok = load_tokenizer(args.tokenizer, args.corpus_mb)
    executor = llguidance.LLExecutor(args.threads)
    print(f"vocabulary {VOCAB}; executor threads: {args.threads or 'default'}")
    for schema in args.schema:
        for n in args.requests:
            print(json.dumps({"schema": schema, "requests": n, **walk(lltok, executor, SCHEMAS[schema], n)}),
                  flush=True)


if __name__ == "__main__":
    main()
