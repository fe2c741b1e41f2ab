"""The benchmarks, installed with the package so that `batchllm-dask bench` runs anywhere.

- `workloads`: the standard workloads (token-id requests built as [system][document][question] trees).
- `engine`: `Engine.generate` on every workload beside the roofline bound (`batchllm_dask.roofline`),
  transformers and vLLM where present: `python -m batchllm_dask.bench.engine --help`.
- `dask_layer`: `ddf.llm.generate` against the engine called directly on the same rows.
- `hf_anchor`: Hugging Face transformers on the workloads (static `generate` and continuous batching).
- `checkpoints`: random-weight checkpoints of the standard model shapes.

Only `workloads` imports nothing beyond numpy; the rest import torch when run.
"""
