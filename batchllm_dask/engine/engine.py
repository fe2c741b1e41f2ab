"""The engine: plan the batch, then loop schedule ▶ launch ▶ (the step before's tokens) retire.

    engine = Engine("path/to/hf_checkpoint", dtype="float32", device="cpu")
    outs = engine.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0))

One `generate` call is one batch in the BatchLLM sense: its prompts are
planned together (global prefix tree, group order, decode-first), every shared
prefix is prefilled once and freed when its last request retires.

The loop keeps the GPU busy by running the host one step ahead: it schedules
and launches step n+1 while step n runs, and only then waits for step n's
sampled tokens, which it reads from pinned memory (pipeline.py says how the
requests carry placeholders meanwhile).  The GPU always has the next step
queued; the host's scheduling, input building and stop checks hide behind it.

A CUDA out-of-memory error while a step is launched is caught: nothing of the
step is committed, the token budget becomes half the failed step's tokens
(decodes included: the scheduler then runs at most that many per step), and
the work is scheduled again in smaller steps (counted in
`GenerationStats.oom_retries`).  The smaller budget lasts for the rest of the
call; the next `generate` starts from the full one again.
"""
from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from .config import EngineConfig, SamplingParams
from .inputs import PreparedPrompt, prepare_prompt, sampling_list
from .jump_forward import jump_forward
from .kv_cache import PageAllocator, kv_bytes_per_page, kv_shortage_message, pages_for
from .files import check_model, has_tokenizer, missing_tokenizer_message
from .model_cache import checkpoint_dir, tokenizer_dir
from .loader import eos_token_ids, load_checkpoint, load_tokenizer, max_model_len
from .outputs import Completion, GenerationStats
from .parallel import RankGroup, load_shard
from .pipeline import SampledStep, mark_sampled, resolve
from .prefix_tree import PrefixPlan, build_prefix_plan
from ..roofline import ModelShape
from .runner import ModelRunner
from .sampler import StopChecker, sampling_row
from .scheduler import Scheduler, StepBatch, order_requests
from .runner import StepLogits
from .sequence import PrefixSeq, RequestSeq
from .staging import SampledTokens
from .step_inputs import build_step_inputs
from .structured import GrammarCompiler, GrammarMatchers

_MIN_OOM_BUDGET = 16  # the smallest token budget an out-of-memory retry goes down to

_CPU_KV_BYTES = 256 << 20
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class Engine:
    """A model loaded on one device (or split over `tensor_parallel_size` of them, parallel.py) with its paged
    KV pool, ready to generate batches."""

    def __init__(self, model: str | os.PathLike, *, dtype: str | None = None, device: str | None = None,
                 config: EngineConfig | None = None, _rank_group: RankGroup | None = None, **options):
        """tensor_parallel_size > 1 (an option): this process is rank 0 of a group it starts (parallel.py);
        _rank_group: this process is that rank of a group (rank_processes.py builds the other ranks so)."""
        self.config = _make_config(config, dtype, device, options)
        self.model_path = os.fspath(model)
        self._ranks, self.group = None, _rank_group
        if _rank_group is None and self.config.tensor_parallel_size > 1:
            from .rank_processes import start_ranks
            self._ranks, self.group = start_ranks(self.model_path, self.config)
            self._close_ranks = weakref.finalize(self, self._ranks.close)
        try:
            self._build()
            if self._ranks is not None:
                self._ranks.wait_ready()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        self.device = self.group.device if self.group is not None else torch.device(
            self.config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _resolve_dtype(self.config.dtype, self.device)
        check_model(self.model_path, self.config.tokenizer)  # a bad file: an error naming it, before any conversion
        self.model_path = checkpoint_dir(self.model_path, _DTYPE_NAMES[self.dtype])  # a GGUF file: its cached conversion
        if self.group is not None:
            self.model, self.args = load_shard(self.model_path, self.dtype, self.device, self.group)
        else:
            self.model, self.args = load_checkpoint(self.model_path, self.dtype, self.device)
        self.tokenizer, self.tokenizer_error = self._load_tokenizer()
        self.eos_token_ids = eos_token_ids(self.model_path, self.tokenizer)
        self.max_model_len = max_model_len(self.args)
        self.num_kv_pages = self._kv_pages()
        self.max_num_batched_tokens = self._token_budget()
        self.max_num_seqs = self._max_num_seqs()
        self.runner = ModelRunner(self.model, self.num_kv_pages, self.config.page_size, self.config.attention_backend,
                                  cuda_graphs=self.config.cuda_graphs, max_num_seqs=self.max_num_seqs,
                                  graph_max_tokens=min(self.config.cuda_graph_max_tokens, self.max_num_batched_tokens))
        if self.group is not None:  # rank 0's tokens on every rank: the ranks' schedulers stay in lock-step
            self.runner.token_sync = self.group.broadcast
        for graphs in (self.runner.graphs, self.runner.mixed_graphs):
            if graphs is not None:
                graphs.capture_all()
        self.stop_checker = StopChecker(self.tokenizer, self.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, self.args.vocab_size, self.eos_token_ids, self.device)
        self.last_stats: GenerationStats | None = None
        self.annotate_steps = False  # mark the loop's phases for torch.profiler (bench/profile.py sets it)

    def _load_tokenizer(self) -> tuple[Any, str | None]:
        """(the tokenizer option's or the model's tokenizer, None), or (None, why not) for a weights-only folder."""
        if self.config.tokenizer is not None:
            return load_tokenizer(tokenizer_dir(self.config.tokenizer)), None
        if not has_tokenizer(self.model_path):
            return None, missing_tokenizer_message(self.model_path)
        return load_tokenizer(self.model_path), None

    def close(self) -> None:
        """Stop a tensor-parallel engine's rank processes and leave its process group (else nothing)."""
        if self._ranks is not None:
            self._close_ranks()

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 progress: bool | Callable[[int, int], None] | None = None) -> list[Completion]:
        """Complete every prompt; results in the order of `prompts`.

        A bad prompt gets finish_reason "error" and a message; the others run.
        progress: True for a tqdm bar (default `EngineConfig.progress`), or a callable called as
        `progress(rows, output_tokens)` each time rows finish (a Dask job's progress bar sums these).
        """
        if self._ranks is not None:  # every rank runs the same call (parallel.py)
            return self._ranks.run(self._generate, prompts, sampling, progress)
        return self._generate(prompts, sampling, progress)

    def _generate(self, prompts: Sequence[str | Sequence[int]],
                  sampling: SamplingParams | Sequence[SamplingParams] | None, progress: bool | None) -> list[Completion]:
        start = time.perf_counter()
        params = sampling_list(sampling, len(prompts))
        prepared = [self._prepare(p, sp) for p, sp in zip(prompts, params)]
        completions = [Completion(i, error=p.error, prompt_tokens=len(p.token_ids)) for i, p in enumerate(prepared)]
        valid = [i for i, p in enumerate(prepared) if p.error is None]
        plan = self._plan([prepared[i].token_ids for i in valid])
        requests = self._make_requests(plan, valid, prepared, params)
        matchers = self.grammars.start({seq.index: seq.params for seq in requests})  # None: nothing constrained
        callback = progress if callable(progress) else None
        show = self.config.progress if progress is None else bool(progress) and callback is None
        with tqdm(total=len(prompts), disable=not show, desc="generate", unit="req") as tqdm_bar:
            bar = _RowProgress(tqdm_bar, callback)
            bar.update(len(prompts) - len(valid))
            scheduler, count = self._run(requests, bar, matchers)
        for seq in requests:
            completions[seq.index] = self._completion(seq, prepared[seq.index])
        self.last_stats = self._stats(completions, plan, [prepared[i] for i in valid], scheduler, count,
                                      time.perf_counter() - start)
        return completions

    # -- planning --------------------------------------------------------------------------
    def _prepare(self, prompt: str | Sequence[int], params: SamplingParams) -> PreparedPrompt:
        """The prompt's token ids, or its error: bad input, no tokenizer for what it needs, too large for the pool."""
        if self.tokenizer is None:
            need = _tokenizer_need(prompt, params)
            if need is not None:
                return PreparedPrompt.refused(f"{need} needs a tokenizer; {self.tokenizer_error}")
        return self._check_fits(prepare_prompt(prompt, self.tokenizer, self.args.vocab_size, self.max_model_len),
                                params)

    def _check_fits(self, prompt: PreparedPrompt, params: SamplingParams) -> PreparedPrompt:
        need = pages_for(len(prompt.token_ids) + params.max_tokens, self.config.page_size)
        if prompt.error is None and need > self.num_kv_pages:
            return PreparedPrompt(prompt.token_ids, kv_shortage_message(need, self.num_kv_pages, self._page_bytes()))
        return prompt

    def _token_budget(self) -> int:
        """Tokens per forward pass: the config's, else chosen from the model's size.

        On CUDA a step should carry about 1.2e14 FLOPs (some 150 ms at 800 TFLOP/s), enough for the host's
        per-step work and the eager launches of a mixed step to hide behind it, for cuBLAS to run near
        its peak, and for the prompts to be in before the batch's last decodes, so that few steps run with
        only a handful of rows: 8192 tokens for an 8B model, 16384 for a 1B one, at most 16384, at least
        4096.  Measured on an H200 (2026-12-04): 1B at 16384 against 8192, 40-47% of the bound against
        37-46%; 8B at 8192 against 4096 in two calls, 0-3% less time on shared-instructions, doc-qa and
        no-sharing, level on long-output (skewed not measured at max_num_seqs 512).  Elsewhere 4096.
        """
        if self.config.max_num_batched_tokens is not None:
            return self.config.max_num_batched_tokens
        if self.device.type != "cuda":
            return 4096
        tokens = int(1.2e14 // (2 * self._linear_params()))
        return min(16384, max(4096, 1 << (tokens.bit_length() - 1)))

    def _max_num_seqs(self) -> int:
        """Running requests at most: the config's, else 1024 where a decode step of 1024 rows carries at least
        1.2e13 FLOPs of linear layers (15 ms at 800 TFLOP/s: an 8B model), else 512.

        More rows a step mean fewer steps and no tail of a few requests decoding alone when a call has more
        requests than the cap (llama-8b skewed, 532 requests: 6.96 s at 512, 6.68 s at 1024; H200, 2026-12-06).
        But the host's time per step grows with the rows (5-19 ms at 1024 rows on the H200's host, 2026-12-04),
        and must hide behind the step's GPU time: a 1B model's 1024-row decode step is about 3 ms of
        arithmetic, so it keeps 512 (at 1024 its shared-instructions run lost 1-12%)."""
        if self.config.max_num_seqs is not None:
            return self.config.max_num_seqs
        big = self.device.type == "cuda" and 1024 * 2 * self._linear_params() >= 1.2e13
        return 1024 if big else 512

    def _linear_params(self) -> int:
        """Weights of the layers' linear products (attention projections and MLP), the LM head not counted:
        the roofline's count, so the step sizes and the bound read the model alike."""
        a = self.args
        return ModelShape(layers=a.num_layers, hidden=a.hidden_size, heads=a.num_heads, kv_heads=a.num_kv_heads,
                          head_dim=a.head_dim, intermediate=a.intermediate_size, vocab=a.vocab_size).linear_params

    @property
    def kv_cache_bytes(self) -> int:
        """The KV pool's size in bytes (what `kv_cache_bytes=` gives another engine to have the same pool)."""
        return self.num_kv_pages * self._page_bytes()

    def _page_bytes(self) -> int:
        a = self.args
        return kv_bytes_per_page(self.config.page_size, a.num_layers, a.num_kv_heads, a.head_dim,
                                 torch.finfo(self.dtype).bits // 8)

    def _plan(self, token_lists: list[np.ndarray]) -> PrefixPlan:
        if not self.config.prefix_sharing:
            return PrefixPlan.unshared(len(token_lists))
        return build_prefix_plan(token_lists, self.config.min_shared_tokens)

    def _make_requests(self, plan: PrefixPlan, valid: list[int], prepared: list[PreparedPrompt],
                       params: list[SamplingParams]) -> list[RequestSeq]:
        """Sequences in run order: shared prefixes first (as parents), then the requests."""
        ratio = [params[i].max_tokens / max(1, len(prepared[i].token_ids)) if self.config.decode_first else 0.0
                 for i in valid]
        order = order_requests(plan, ratio)
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
            seq = RequestSeq(start, ids[start:].tolist(), parent, rank[k], index=i, params=params[i], seed=seed,
                             num_prompt=len(ids) - start, sampling_row=sampling_row(params[i], seed),
                             stop_ids=self._stop_ids(params[i]))
            for prefix in seq.ancestors():
                prefix.users += 1
                prefix.rank = min(prefix.rank, seq.rank)
                if prefix.prefix_id in claimed:
                    seq.num_cached += len(prefix.tokens)
                claimed.add(prefix.prefix_id)
            requests.append(seq)
        return requests

    # -- the loop --------------------------------------------------------------------------
    def _run(self, requests: list[RequestSeq], bar: _RowProgress,
             matchers: GrammarMatchers | None = None) -> tuple[Scheduler, _LoopCounters]:
        """Run every request to the end: launch step n+1, then retire what step n's tokens finished.

        Structured output (matchers): a constrained row's mask for step n+1 needs step n's token, so a step
        with such rows is sampled only after step n's tokens are in, while its forward pass runs.
        """
        scheduler = Scheduler(requests, PageAllocator(self.num_kv_pages), self.config.page_size,
                              self.max_num_batched_tokens, self.max_num_seqs,
                              self.config.decode_reserve, page_bytes=self._page_bytes(),
                              step_sizes=self.runner.step_sizes)
        count = _LoopCounters()
        phase = record_function if self.annotate_steps else _no_phase
        in_flight: _InFlight | None = None

        def finish(seq: RequestSeq) -> None:
            scheduler.finish(seq)
            if matchers is not None:
                matchers.release([seq.index])
            bar.update(1, len(seq.output))

        while True:
            launched, retried = None, False
            if not scheduler.done:
                with phase("engine.schedule"):
                    batch = scheduler.schedule()
                bar.update(len(batch.failed))
                if batch.num_tokens:
                    with phase("engine.launch"):
                        launched = self._launch(scheduler, batch, in_flight, matchers)
                    retried = launched is None
                    count.step(batch.num_tokens, retried)
            if in_flight is not None:
                with phase("engine.wait"):
                    waited = time.perf_counter()
                    values = in_flight.tokens.wait()
                    count.wait_seconds += time.perf_counter() - waited
                with phase("engine.resolve"):
                    resolve(in_flight.sampled, values, self.stop_checker, finish, matchers)
            elif launched is None and not retried:
                if scheduler.done:
                    break
                raise RuntimeError("scheduler made no progress: this is a bug, please report it")
            if launched is not None and launched.tokens is None:  # constrained rows: masks from the tokens just in
                with phase("engine.grammar"):
                    if self.config.jump_forward:
                        jump_forward(launched.sampled.seqs, launched.sampled.positions, matchers, scheduler,
                                     self.max_model_len)
                    mask = matchers.fill_mask([seq.index for seq in launched.sampled.seqs])
                    launched.tokens = self.runner.sample(launched.logits, mask)
            in_flight = launched
        return scheduler, count

    def _launch(self, scheduler: Scheduler, batch: StepBatch, in_flight: _InFlight | None,
                matchers: GrammarMatchers | None) -> _InFlight | None:
        """Launch a step and commit it, or, on a CUDA out-of-memory error, halve the step's size and return None.

        The step is sampled at once unless one of its rows is constrained (see `_run`).
        """
        inputs = build_step_inputs(batch, self.config.page_size)
        try:
            logits = self.runner.forward(inputs, in_flight.tokens if in_flight is not None else None)
        except torch.OutOfMemoryError:
            if scheduler.max_batched_tokens <= _MIN_OOM_BUDGET or self.group is not None:  # ranks would disagree
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            # Half of what failed, not of the budget: a step smaller than the budget (the tail of a call) must shrink
            # too.  The scheduler keeps every later step of this call under it, decodes included.
            failed = min(scheduler.max_batched_tokens, batch.num_tokens)
            scheduler.max_batched_tokens = max(_MIN_OOM_BUDGET, failed // 2)
            return None
        scheduler.commit(batch)
        seqs = [c.seq for c in batch.sampled]
        constrained = matchers is not None and any(matchers.constrained(seq.index) for seq in seqs)
        tokens = None if constrained else self.runner.sample(logits)
        return _InFlight(mark_sampled(seqs, self.max_model_len), logits, tokens)

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        eos = () if params.ignore_eos else self.eos_token_ids
        return frozenset((*eos, *params.stop_token_ids))

    # -- results ---------------------------------------------------------------------------
    def _completion(self, seq: RequestSeq, prompt: PreparedPrompt) -> Completion:
        if seq.finish_reason == "error":
            return Completion(seq.index, error=seq.error, prompt_tokens=len(prompt.token_ids))
        output = list(seq.output)
        text = seq.text if seq.text is not None else self.stop_checker.decode(output)
        return Completion(seq.index, text, output, seq.finish_reason or "length",
                          len(prompt.token_ids), len(output), cached_tokens=seq.num_cached)

    def _stats(self, completions: list[Completion], plan: PrefixPlan, valid: list[PreparedPrompt],
               scheduler: Scheduler, count: _LoopCounters, seconds: float) -> GenerationStats:
        prompt_lens = [len(p.token_ids) for p in valid]
        return GenerationStats(
            requests=len(completions), failed_requests=sum(c.finish_reason == "error" for c in completions),
            prompt_tokens=sum(prompt_lens),
            computed_prompt_tokens=plan.computed_prompt_tokens(prompt_lens) + scheduler.recomputed_tokens,
            output_tokens=sum(c.completion_tokens for c in completions), shared_prefixes=len(plan.prefixes),
            steps=count.steps, mean_tokens_per_step=count.batched_tokens / count.steps if count.steps else 0.0,
            peak_kv_pages=scheduler.allocator.peak_used, kv_pages=self.num_kv_pages,
            preemptions=scheduler.num_preemptions, recomputed_tokens=scheduler.recomputed_tokens,
            oom_retries=count.oom_retries, wait_seconds=count.wait_seconds, seconds=seconds)

    def _kv_pages(self) -> int:
        per_page = self._page_bytes()
        budget = self.config.kv_cache_bytes
        if budget is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = int(free * self.config.kv_cache_fraction)
        pages = (budget or _CPU_KV_BYTES) // per_page
        if self.group is not None:
            pages = self.group.min_int(pages)
        if pages < 1:
            raise ValueError(f"kv_cache_bytes: {budget} bytes hold no KV page of {per_page} bytes")
        return pages


@dataclass
class _RowProgress:
    """The tqdm bar and the caller's `progress(rows, output_tokens)` callback, updated together as rows finish."""

    bar: tqdm
    callback: Callable[[int, int], None] | None = None

    def update(self, rows: int, output_tokens: int = 0) -> None:
        self.bar.update(rows)
        if self.callback is not None and rows:
            self.callback(rows, output_tokens)


@dataclass
class _LoopCounters:
    steps: int = 0
    batched_tokens: int = 0
    oom_retries: int = 0
    wait_seconds: float = 0.0  # the host blocked on the device's tokens (the rest of the loop is host work)

    def step(self, num_tokens: int, retried: bool) -> None:
        self.oom_retries += retried
        self.steps += not retried
        self.batched_tokens += 0 if retried else num_tokens


def _tokenizer_need(prompt: object, params: SamplingParams) -> str | None:
    """What of this request needs a tokenizer (text, stop strings, a grammar), or None: token ids alone run."""
    if isinstance(prompt, str):
        return "a text prompt"
    if params.stop:
        return "stop strings"
    if params.constraint is not None:
        return f"a {params.constraint[0]} constraint"
    return None


def _no_phase(name: str) -> contextlib.nullcontext:
    return contextlib.nullcontext()


@dataclass
class _InFlight:
    """A launched step: who it samples (with their placeholders), its logits, and its tokens once sampled."""

    sampled: SampledStep
    logits: StepLogits
    tokens: SampledTokens | None


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
