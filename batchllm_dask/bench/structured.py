"""Throughput of a JSON-schema-constrained job against the same job unconstrained (issue 15: within 15%).

The job: the shared-instructions workload's token-id prompts (workloads.py, scaled), greedy, on a
random-weight checkpoint (llama-1b by default).  Constrained, each request follows a JSON schema and
ends when its JSON is complete: `--schema review` (the default, `REVIEW`: five fields, three of them
free-text strings with `maxLength`, whose masks are the grammar library's expensive case) or
`--schema classify` (`CLASSIFY`: an ETL classification record of labels, numbers, a flag and a date).  Unconstrained, each request then generates
exactly as many tokens as it did constrained (EOS ignored), so both runs do the same model work and
the difference is the grammar's: masks on the host, their copy, and applying them.  Rounds
alternate the two; medians are reported, with the host time spent in the grammar calls.

The vocabulary the grammar sees: the random checkpoints carry the embedded byte-level tokenizer,
259 tokens of the 128256 ids, over which masks would be unrealistically cheap (the grammar walks
the tokens the tokenizer has).  So the checkpoint gets a byte-level BPE tokenizer of the model's
vocabulary size, trained here on the Python standard library's source in a few seconds
(`--tokenizer DIR` uses a real one instead, e.g. Llama 3's).  On the CPU its masks cost about as
much as Llama 3's do: llguidance, 32 requests, median 8.7 ms a step against 5.8 ms.

On the device (carry .whl: llguidance and the dask wheels, see benchmarks/device_setup.sh):
    source benchmarks/device_setup.sh && python3 -m batchllm_dask.bench.structured
On a CPU, a tiny model, a few requests and a 2048-token BPE:
    python -m batchllm_dask.bench.structured --tiny
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..engine import Engine, SamplingParams
from ..engine.structured import GrammarMatchers
from ..json_columns import add_field_columns
from .workloads import make_workload

REVIEW = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24},
    "rating": {"type": "integer", "minimum": 1, "maximum": 5},
    "sentiment": {"enum": ["positive", "neutral", "negative"]},
    "summary": {"type": "string", "maxLength": 64},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
    "required": ["name", "rating", "sentiment", "summary", "tags"]}
# An ETL classification record: labels from fixed sets, numbers, a flag, a date; no free text.
CLASSIFY = {"type": "object", "properties": {
    "category": {"enum": ["billing", "shipping", "returns", "account", "product", "other"]},
    "priority": {"type": "integer", "minimum": 1, "maximum": 5},
    "sentiment": {"enum": ["positive", "neutral", "negative"]},
    "refund_requested": {"type": "boolean"},
    "order_date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"},
    "topics": {"type": "array", "items": {"enum": ["price", "delay", "quality", "support", "size"]},
               "maxItems": 3}},
    "required": ["category", "priority", "sentiment", "refund_requested", "order_date", "topics"]}
SCHEMAS = {"review": REVIEW, "classify": CLASSIFY}
SCHEMA = REVIEW  # the default: bounded free-text strings, the grammar's expensive case
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"]


# ------------------------------------------------------------------------------------ the vocabulary

def train_tokenizer(vocab_size: int, corpus_bytes: int) -> Any:
    """A byte-level BPE of `vocab_size` tokens (specials included) trained on the standard library's *.py."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))

    def corpus():
        left = corpus_bytes
        for f in files:
            if left <= 0:
                return
            text = f.read_text(errors="ignore")
            left -= len(text)
            yield text
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[1],
                                   pad_token=SPECIALS[2])


def install_tokenizer(checkpoint: Path, tokenizer: Any) -> None:
    """Save `tokenizer` into the checkpoint and point its EOS (config and generation config) at the tokenizer's."""
    for old in checkpoint.glob("tokenizer*"):
        old.unlink()
    tokenizer.save_pretrained(checkpoint)
    for name in ("config.json", "generation_config.json"):
        path = checkpoint / name
        if path.is_file():
            config = json.loads(path.read_text())
            config.update(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
            path.write_text(json.dumps(config, indent=1))


# ------------------------------------------------------------------------------------ the runs

class GrammarTimer:
    """Host seconds spent in `GrammarMatchers.fill_mask`, `accept` and `jump_forward`, wrapped inside the
    `with` block; the forced tokens jump-forward appended, and the masks the grammar computed per constrained
    token generated (1.0: a full mask for every token; jumped tokens and pre-accepted ones need none)."""

    NAMES = ("fill_mask", "accept", "jump_forward")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.NAMES, 0.0)
        self.calls = self.masks = self.tokens = self.jumped = 0
        self._originals = {name: getattr(GrammarMatchers, name) for name in self.NAMES}

    def __enter__(self) -> "GrammarTimer":
        for name, method in self._originals.items():
            setattr(GrammarMatchers, name, self._timed(name, method))
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, method in self._originals.items():
            setattr(GrammarMatchers, name, method)

    def _timed(self, name: str, method: Any) -> Any:
        def timed(matchers, *args):
            start = time.perf_counter()
            before = matchers.masks_computed, matchers.tokens_accepted, matchers.tokens_jumped
            try:
                return method(matchers, *args)
            finally:
                self.seconds[name] += time.perf_counter() - start
                self.calls += name == "fill_mask"
                self.masks += matchers.masks_computed - before[0]
                self.tokens += matchers.tokens_accepted - before[1]
                self.jumped += matchers.tokens_jumped - before[2]
        return timed

    def take(self) -> dict[str, float]:
        out = {**{f"{k}_seconds": v for k, v in self.seconds.items()}, "fill_mask_calls": self.calls,
               "masks_computed": self.masks, "tokens_jumped": self.jumped,
               "masks_per_token": self.masks / max(1, self.tokens + self.jumped)}
        self.seconds = dict.fromkeys(self.NAMES, 0.0)
        self.calls = self.masks = self.tokens = self.jumped = 0
        return out


def timed_generate(engine: Engine, prompts: list, params: list[SamplingParams]) -> tuple[float, list]:
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    sync()
    return time.perf_counter() - start, outs


def validity(outs: list, schema: dict) -> dict[str, int]:
    """How many constrained outputs fill the schema's typed columns, and how many max_tokens cut."""
    cols = {"completion": pd.Series([o.text for o in outs], dtype="str"),
            "completion_tokens": pd.Series([o.completion_tokens for o in outs], dtype="int64"),
            "finish_reason": pd.Series([o.finish_reason for o in outs], dtype="str"),
            "error": pd.Series([o.error for o in outs], dtype="str")}
    errors = add_field_columns(cols, SamplingParams(json_schema=schema).json_schema, "completion")["error"]
    return {"valid": int(errors.isna().sum()), "cut_by_max_tokens": sum(o.finish_reason == "length" for o in outs)}


def run_rounds(engine: Engine, prompts: list, max_tokens: int, rounds: int, timer: GrammarTimer,
               schema: dict = SCHEMA) -> list[dict]:
    constrained = [SamplingParams(max_tokens=max_tokens, temperature=0.0, json_schema=schema)] * len(prompts)
    results = []
    for r in range(rounds):
        c_secs, c_outs = timed_generate(engine, prompts, constrained)
        grammar = timer.take()
        c_steps = engine.last_stats.steps
        plain = [SamplingParams(max_tokens=max(1, o.completion_tokens), temperature=0.0, ignore_eos=True)
                 for o in c_outs]
        u_secs, u_outs = timed_generate(engine, prompts, plain)
        tokens = sum(o.completion_tokens for o in c_outs)
        assert sum(o.completion_tokens for o in u_outs) == tokens, "the unconstrained job must match the token counts"
        row = {"round": r, "output_tokens": tokens, "constrained_seconds": c_secs, "unconstrained_seconds": u_secs,
               "constrained_steps": c_steps, "unconstrained_steps": engine.last_stats.steps,
               "throughput_ratio": u_secs / c_secs, **grammar, **validity(c_outs, schema)}
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


# ------------------------------------------------------------------------------------ main

def make_checkpoint(args: argparse.Namespace) -> tuple[Path, list]:
    """A random checkpoint with the grammar's vocabulary installed, and the prompts (token ids)."""
    from .checkpoints import save_random_checkpoint, save_tiny_checkpoint
    path = Path(tempfile.mkdtemp()) / args.model
    if args.tiny:
        vocab = 2048
        save_tiny_checkpoint(path, vocab)
        rng = np.random.default_rng(0)
        shared = rng.integers(3, vocab, 48).tolist()
        prompts = [shared + rng.integers(3, vocab, 16).tolist() for _ in range(args.requests or 8)]
    else:
        from ..roofline import SHAPES
        vocab = SHAPES[args.model].vocab
        save_random_checkpoint(path, args.model)
        reqs = make_workload("shared-instructions", vocab, args.scale)
        prompts = [r.prompt_token_ids for r in reqs][:args.requests or None]
    start = time.perf_counter()
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = train_tokenizer(vocab, args.corpus_mb << 20)
    install_tokenizer(path, tokenizer)
    print(f"tokenizer: {len(tokenizer)} tokens for {vocab} ids ({'given' if args.tokenizer else 'trained'} "
          f"in {time.perf_counter() - start:.1f}s)", flush=True)
    return path, prompts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-1b", help="a roofline.SHAPES name")
    ap.add_argument("--scale", type=float, default=0.5, help="shared-instructions workload scale (0.5: 1024 requests)")
    ap.add_argument("--requests", type=int, default=0, help="keep only the first N requests (0: all)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer folder for the grammar (default: train)")
    ap.add_argument("--corpus-mb", type=int, default=48, help="standard library text to train the tokenizer on")
    ap.add_argument("--tiny", action="store_true", help="CPU check: tiny model, 8 requests, one round")
    ap.add_argument("--schema", choices=sorted(SCHEMAS), default="review",
                    help="review: bounded free-text strings (the expensive masks); classify: labels, numbers, a date")
    ap.add_argument("--no-jump-forward", action="store_true", help="decode forced tokens one a step (the ablation)")
    ap.add_argument("--no-mixed-graphs", action="store_true",
                    help="steps with prefill chunks (jump-forward's runs) eager: the mixed-graphs ablation")
    ap.add_argument("--no-reuse-by-state", action="store_true",
                    help="every row's mask and forced run computed anew, none shared by grammar state (ablation)")
    ap.add_argument("--parallel-accept", action="store_true",
                    help="tokens accepted through the executor's threads (64+ rows), not one row after another")
    ap.add_argument("--lexer-copies", type=int, default=0,
                    help="compiled copies of the grammar (0: one per mask thread, the default; 1: every request's "
                         "matcher shares one lexer, as before)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.rounds, args.corpus_mb, args.max_tokens = "tiny", 1, 4, min(args.max_tokens, 160)
    schema = SCHEMAS[args.schema]
    path, prompts = make_checkpoint(args)
    device = "cpu" if args.tiny else "cuda"
    engine = Engine(path, dtype="float32" if args.tiny else "bfloat16", device=device,
                    jump_forward=not args.no_jump_forward,
                    **({"cuda_graph_max_tokens": 0} if args.no_mixed_graphs else {}),
                    **({"kv_cache_bytes": 64 << 20} if args.tiny else {}))
    engine.grammars.reuse_by_state = not args.no_reuse_by_state
    engine.grammars.parallel_accept = args.parallel_accept
    if args.lexer_copies:
        engine.grammars.lexer_copies = args.lexer_copies
    with GrammarTimer() as timer:
        start = time.perf_counter()  # warm-up; the first constrained call builds the grammar's tokenizer
        engine.generate(prompts[:64], SamplingParams(max_tokens=8, temperature=0.0, json_schema=schema))
        engine.generate(prompts[:64], SamplingParams(max_tokens=8, temperature=0.0))
        timer.take()
        print(f"warm-up (grammar tokenizer included) {time.perf_counter() - start:.1f}s; {len(prompts)} requests",
              flush=True)
        rows = run_rounds(engine, prompts, args.max_tokens, args.rounds, timer, schema)
    ratio = statistics.median(r["throughput_ratio"] for r in rows)
    env = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "vocab_tokens": len(engine.tokenizer)}
    suffix = "".join(f"_{flag}" for flag in ("no-jump-forward", "no-mixed-graphs", "no-reuse-by-state",
                                              "parallel-accept") if getattr(args, flag.replace("-", "_")))
    suffix += f"_lexer-copies{args.lexer_copies}" if args.lexer_copies else ""
    out = Path(args.out) / f"bench_structured_{args.model}_{args.schema}{suffix}.json"
    out.write_text(json.dumps({**env, "args": vars(args), "schema": schema, "rows": rows,
                               "median_throughput_ratio": ratio}, indent=1))
    last = rows[-1]
    print(f"\nconstrained / unconstrained throughput, median of {len(rows)} rounds: {ratio:.3f} "
          f"(target >= 0.85); {last['output_tokens']} output tokens a run, "
          f"valid {last['valid']}/{len(prompts)}, cut by max_tokens {last['cut_by_max_tokens']}; "
          f"grammar host time in the last run: fill_mask {last['fill_mask_seconds']:.2f}s over "
          f"{last['fill_mask_calls']} steps ({last['masks_computed']} masks, {last['masks_per_token']:.2f} per "
          f"generated token), accept {last['accept_seconds']:.2f}s, jump-forward {last['jump_forward_seconds']:.2f}s "
          f"({last['tokens_jumped']} forced tokens appended); wrote {out}")


if __name__ == "__main__":
    main()
