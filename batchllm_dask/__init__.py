"""batchllm-dask: offline large-batch LLM inference over dataframes (BatchLLM on Dask)."""
