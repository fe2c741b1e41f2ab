"""Run a module as a script with some module-level settings changed first: an A/B of a kernel or planner constant
in a process of its own, on the same machine and checkpoint as the baseline.

    python3 benchmarks/run_variant.py batchllm_dask.kernels.attention_plan.PROGRAMS_PER_SM=4 -- \
        batchllm_dask.bench.engine --model llama-8b --scales 0.25 --out OUT

Each NAME=VALUE sets attribute NAME of its module to VALUE read as a Python literal; the module after `--` then
runs as `python -m` would run it, with the arguments after it.
"""
from __future__ import annotations

import ast
import importlib
import runpy
import sys


def apply(setting: str) -> None:
    target, _, value = setting.partition("=")
    module_name, _, attribute = target.rpartition(".")
    module = importlib.import_module(module_name)
    if not hasattr(module, attribute):
        raise SystemExit(f"{module_name} has no setting {attribute!r}")
    setattr(module, attribute, ast.literal_eval(value))
    print(f"variant: {module_name}.{attribute} = {value}", flush=True)


def main() -> None:
    if "--" not in sys.argv:
        raise SystemExit(__doc__)
    split = sys.argv.index("--")
    for setting in sys.argv[1:split]:
        apply(setting)
    module, *args = sys.argv[split + 1:]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
