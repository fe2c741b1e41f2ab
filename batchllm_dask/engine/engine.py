"""The engine: plan the batch, then loop schedule ▶ forward ▶ sample ▶ retire.

    engine = Engine("path/to/hf_checkpoint", dtype="float32", device="cpu")
    outs = engine.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0))

One `generate` call is one batch in the BatchLLM sense: its prompts are
planned together (global prefix tree, group order, decode-first), every shared
prefix is prefilled once and freed when its last request retires.
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import fields, replace

import torch
from tqdm.auto import tqdm

from .config import EngineConfig, SamplingParams
from .inputs import PreparedPrompt, prepare_prompt, sampling_list
from .kv_cache import PageAllocator, kv_bytes_per_page, pages_for
from .loader import eos_token_ids, load_checkpoint, load_tokenizer, max_model_len
from .outputs import Completion, GenerationStats
from .prefix_tree import PrefixPlan, build_prefix_plan
from .runner import ModelRunner
from .sampler import StopChecker
from .scheduler import Scheduler, order_requests
from .sequence import PrefixSeq, RequestSeq
from .structured import GrammarCompiler, GrammarMatchers

_CPU_KV_BYTES = 256 << 20
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Engine:
    """A model loaded on one device with its paged KV pool, ready to generate batches."""

    def __init__(self, model: str | os.PathLike, *, dtype: str | None = None, device: str | None = None,
                 config: EngineConfig | None = None, **options):
        self.config = _make_config(config, dtype, device, options)
        self.model_path = os.fspath(model)
        self.device = torch.device(self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _resolve_dtype(self.config.dtype, self.device)
        self.model, self.args = load_checkpoint(self.model_path, self.dtype, self.device)
        self.tokenizer = load_tokenizer(self.model_path)
        self.eos_token_ids = eos_token_ids(self.model_path, self.tokenizer)
        self.max_model_len = max_model_len(self.args)
        self.num_kv_pages = self._kv_pages()
        self.runner = ModelRunner(self.model, self.num_kv_pages, self.config.page_size, self.config.attention_backend,
                                  cuda_graphs=self.config.cuda_graphs, max_num_seqs=self.config.max_num_seqs)
        self.stop_checker = StopChecker(self.tokenizer, self.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, self.args.vocab_size, self.eos_token_ids, self.device)
        self.last_stats: GenerationStats | None = None

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 progress: bool | None = None) -> list[Completion]:
        """Complete every prompt; results in the order of `prompts`.

        A bad prompt gets finish_reason "error" and a message; the others run.
        """
        start = time.perf_counter()
        params = sampling_list(sampling, len(prompts))
        prepared = [prepare_prompt(p, self.tokenizer, self.args.vocab_size, self.max_model_len) for p in prompts]
        prepared = [self._check_fits(p, sp) for p, sp in zip(prepared, params)]
        completions = [Completion(i, error=p.error, prompt_tokens=len(p.token_ids)) for i, p in enumerate(prepared)]
        valid = [i for i, p in enumerate(prepared) if p.error is None]
        plan = self._plan([prepared[i].token_ids for i in valid])
        requests = self._make_requests(plan, valid, prepared, params)
        matchers = self.grammars.start({seq.index: seq.params for seq in requests})  # None: nothing constrained
        show = self.config.progress if progress is None else progress
        with tqdm(total=len(prompts), disable=not show, desc="generate", unit="req") as bar:
            bar.update(len(prompts) - len(valid))
            scheduler, steps, tokens = self._run(requests, bar, matchers)
        for seq in requests:
            completions[seq.index] = self._completion(seq, prepared[seq.index])
        self.last_stats = self._stats(completions, plan, [prepared[i] for i in valid], scheduler, steps, tokens,
                                      time.perf_counter() - start)
        return completions

    # -- planning --------------------------------------------------------------------------
    def _check_fits(self, prompt: PreparedPrompt, params: SamplingParams) -> PreparedPrompt:
        need = pages_for(len(prompt.token_ids) + params.max_tokens, self.config.page_size)
        if prompt.error is None and need > self.num_kv_pages:
            return PreparedPrompt(prompt.token_ids, f"prompt plus max_tokens needs {need} KV pages but the cache "
                                                    f"has {self.num_kv_pages}: lower max_tokens or raise the KV memory")
        return prompt

    def _plan(self, token_lists: list[list[int]]) -> PrefixPlan:
        if not self.config.prefix_sharing:
            return PrefixPlan.unshared(len(token_lists))
        return build_prefix_plan(token_lists, self.config.min_shared_tokens)

    def _make_requests(self, plan: PrefixPlan, valid: list[int], prepared: list[PreparedPrompt],
                       params: list[SamplingParams]) -> list[RequestSeq]:
        """Sequences in run order: shared prefixes first (as parents), then the requests."""
        order = order_requests(plan, [params[i].max_tokens / max(1, len(prepared[i].token_ids)) for i in valid])
        rank = {k: r for r, k in enumerate(order)}
        prefixes: list[PrefixSeq] = []
        for p in plan.prefixes:
            parent = prefixes[p.parent] if p.parent is not None else None
            prefixes.append(PrefixSeq(p.start, list(p.tokens), parent, rank=len(order), prefix_id=p.id))
        requests = []
        claimed: set[int] = set()  # prefixes whose computation is credited to an earlier request
        for k in order:
            i, ids = valid[k], prepared[valid[k]].token_ids
            start, node = plan.suffix_start(k), plan.request_prefix[k]
            parent = prefixes[node] if node is not None else None
            seed = params[i].seed if params[i].seed is not None else self.config.seed * 1_000_003 + i
            seq = RequestSeq(start, ids[start:], parent, rank[k], index=i, params=params[i], seed=seed,
                             num_prompt=len(ids) - start)
            for prefix in seq.ancestors():
                prefix.users += 1
                prefix.rank = min(prefix.rank, seq.rank)
                if prefix.prefix_id in claimed:
                    seq.num_cached += len(prefix.tokens)
                claimed.add(prefix.prefix_id)
            requests.append(seq)
        return requests

    # -- the loop --------------------------------------------------------------------------
    def _run(self, requests: list[RequestSeq], bar: tqdm,
             matchers: GrammarMatchers | None = None) -> tuple[Scheduler, int, int]:
        scheduler = Scheduler(requests, PageAllocator(self.num_kv_pages), self.config.page_size,
                              self.config.max_num_batched_tokens, self.config.max_num_seqs)
        steps = batched_tokens = 0
        while not scheduler.done:
            batch = scheduler.schedule()
            bar.update(len(batch.failed))
            if batch.num_tokens == 0:
                if scheduler.done:
                    break
                raise RuntimeError("scheduler made no progress: this is a bug, please report it")
            sampled = self.runner.run(batch, matchers)
            scheduler.commit(batch)
            steps, batched_tokens = steps + 1, batched_tokens + batch.num_tokens
            # structured output: advance the grammars by this step's tokens (structured.py)
            ended = set(matchers.accept([c.seq.index for c in batch.sampled], sampled)) if matchers else set()
            for chunk, token in zip(batch.sampled, sampled):
                if self._append(chunk.seq, token, chunk.seq.index in ended):
                    scheduler.finish(chunk.seq)
                    if matchers:
                        matchers.release([chunk.seq.index])
                    bar.update(1)
        return scheduler, steps, batched_tokens

    def _append(self, seq: RequestSeq, token: int, grammar_ended: bool = False) -> bool:
        """Add a sampled token; True when the request is finished."""
        seq.tokens.append(token)
        decision = self.stop_checker.check(seq.output, seq.params, grammar_ended)
        if decision.finished:
            seq.finish_reason, seq.text = decision.reason, decision.text
        elif seq.end >= self.max_model_len:
            seq.finish_reason, seq.text = "length", self.stop_checker.decode(seq.output)
        return seq.finish_reason is not None

    # -- results ---------------------------------------------------------------------------
    def _completion(self, seq: RequestSeq, prompt: PreparedPrompt) -> Completion:
        if seq.finish_reason == "error":
            return Completion(seq.index, error=seq.error, prompt_tokens=len(prompt.token_ids))
        return Completion(seq.index, seq.text, list(seq.output), seq.finish_reason or "length",
                          len(prompt.token_ids), len(seq.output), cached_tokens=seq.num_cached)

    def _stats(self, completions: list[Completion], plan: PrefixPlan, valid: list[PreparedPrompt],
               scheduler: Scheduler, steps: int, batched_tokens: int, seconds: float) -> GenerationStats:
        prompt_lens = [len(p.token_ids) for p in valid]
        return GenerationStats(
            requests=len(completions), failed_requests=sum(c.finish_reason == "error" for c in completions),
            prompt_tokens=sum(prompt_lens),
            computed_prompt_tokens=plan.computed_prompt_tokens(prompt_lens) + scheduler.recomputed_tokens,
            output_tokens=sum(c.completion_tokens for c in completions), shared_prefixes=len(plan.prefixes),
            steps=steps, mean_tokens_per_step=batched_tokens / steps if steps else 0.0,
            peak_kv_pages=scheduler.allocator.peak_used, kv_pages=self.num_kv_pages,
            preemptions=scheduler.num_preemptions, recomputed_tokens=scheduler.recomputed_tokens, seconds=seconds)

    def _kv_pages(self) -> int:
        a = self.args
        per_page = kv_bytes_per_page(self.config.page_size, a.num_layers, a.num_kv_heads, a.head_dim,
                                     torch.finfo(self.dtype).bits // 8)
        budget = self.config.kv_cache_bytes
        if budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.kv_cache_fraction)
        pages = (budget or _CPU_KV_BYTES) // per_page
        if pages < 1:
            raise ValueError(f"kv_cache_bytes: {budget} bytes hold no KV page of {per_page} bytes")
        return pages


def _make_config(config: EngineConfig | None, dtype: str | None, device: str | None, options: dict) -> EngineConfig:
    known = {f.name for f in fields(EngineConfig)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(f"unknown engine option(s) {sorted(unknown)}; known: {sorted(known)}")
    overrides = {**options, **({"dtype": dtype} if dtype is not None else {}),
                 **({"device": device} if device is not None else {})}
    return replace(config or EngineConfig(), **overrides)


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]
