"""The embedded BatchLLM engine: prefix tree, paged KV, scheduler, model, sampler."""
