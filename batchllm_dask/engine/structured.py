"""Grammar-constrained decoding: a token mask per constrained request, applied before sampling.

The grammar library is llguidance 1.9, chosen over xgrammar 0.2.8 by measurement (2 CPU
cores, Llama 3's 128256-token vocabulary, a five-field JSON schema, random allowed tokens):
a step's masks for 32 requests took 5.8 ms (median; p95 12.7) against 13.8 ms (p95 39.8), for
128 requests 18 ms against 46 ms; a new grammar costs 3 ms against 1.5 s of vocabulary
preprocessing (per distinct schema or choice list); and its wheel needs nothing else (xgrammar
brings pydantic and apache-tvm-ffi).  Its tokenizer takes longer to build (1.8 s against 0.6 s),
once per engine.  On the 259-token byte tokenizer both are well under a millisecond.  Per engine, a `GrammarCompiler` holds the tokenizer as llguidance sees it (built on
first use, about 2 s for a 128k vocabulary, never for an engine without constraints), each
distinct grammar compiled up to once per mask thread (`GrammarTemplate`: the matchers copied
from one compiled matcher share its lexer and its lock), which requests copy (~15 us), and a
thread pool that computes masks.  Per `generate` call, `GrammarMatchers` keeps one matcher per
constrained request, keyed by request id:

    matchers = compiler.start({request_id: params})   # None when no request is constrained
    each step, for the rows it samples:
        mask = matchers.fill_mask(ids)                # host int32 [R, ceil(V/32)] (pinned on CUDA), or None
        logits = apply_token_mask(logits, mask.to(device, non_blocking=True))    # sampler.py
        tokens = sample(logits, ...)
        ended = matchers.accept(ids, tokens)          # ids whose grammar is complete

The mask for a request's next token depends only on the tokens it has accepted, so with the
host one step ahead of the GPU the order is: launch forward(n+1), accept step n's tokens, fill
step n+1's masks while forward(n+1) runs, copy them over, then launch the masked sampling.
Nothing here waits on the device.

Jump-forward (jump_forward.py): where the grammar forces the next tokens (a key, the quotes and colon
after it, the rest of an enum value), `jump_forward` consumes the whole forced run at once.  Its first
token is the one the step being sampled must produce (its mask row allows only that token, so the device
samples it whatever the temperature); the others join the request as known tokens, computed in the next
step as one chunk, with no mask and no step of their own.  The first token is then "pre-accepted":
`accept` checks the device's sample against it instead of consuming it again.  A run stops before a token
that would complete the grammar, a stop id, or the room the caller gives (max_tokens, the context, the
request's pages), so that a request still ends on a sampled token, as without jumps.
A state's forced tokens (llguidance's `compute_ff_tokens`, 20-50 us, serial: it holds the GIL) are
computed once per state, a state named by its template and the tokens consumed (`TokenHistories`: equal
histories, equal states), and reused by every request that reaches it; so is a mask, among the rows of
one step.

Bit j of word w of a row allows token 32 * w + j (llguidance's and xgrammar's layout).
Unconstrained rows of a mixed step are all ones.  Ids past the tokenizer's vocabulary (a
padded embedding) are never allowed.  A grammar ends in one of two ways: nothing can follow
(`accept` reports the request at once; its last token is the grammar's, no EOS), or it may
end and EOS is allowed (EOS ends the request through `StopChecker`, as any EOS does).  A
matcher that has ended allows only EOS: a token sampled after the end is the caller's to
discard.  Prefix sharing is untouched: masks apply to generated tokens only.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import constraints
from .config import SamplingParams


class GrammarCompiler:
    """One engine's grammar state: the llguidance tokenizer, compiled grammars, the mask thread pool."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int],
                 device: torch.device | str = "cpu"):
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.pin_memory = torch.device(device).type == "cuda"
        self._tokenizer: Any = None
        self._executor: Any = None
        # Accept tokens through the executor's thread pool (64+ rows)?  Off: on the H200's host (16 cores), llama-1b
        # with the review schema, one row after another took 0.16 s against 0.22 s and the constrained run 6.2 s
        # against 7.0 s, its masks included (benchmarks/gpu_structured_reuse.sh, 2026-12-04): the pool's wake-up
        # slows the mask pass after it.  The 2-core CPU measurement that chose it (structured_masks_accept.py) had
        # no GPU run beside it.
        self.parallel_accept = False
        self.reuse_by_state = True  # off: every row's mask and forced tokens computed anew (the reference, in tests)
        self.threads = mask_threads()
        self.lexer_copies = self.threads  # compiled copies per grammar (GrammarTemplate); 1: the old way, for bench
        self._templates: dict[str, GrammarTemplate] = {}

    def start(self, params: Mapping[int, SamplingParams]) -> "GrammarMatchers | None":
        """Matchers for the constrained requests among `params` (request id -> params); None if there are none.

        Raises ValueError when a grammar cannot be built for this tokenizer (before anything runs).
        """
        grammars = {rid: constraints.grammar_of(*p.constraint) for rid, p in params.items() if p.constraint}
        if not grammars:
            return None
        templates = {g: self._template(g, n) for g, n in Counter(grammars.values()).items()}
        return GrammarMatchers({rid: templates[g] for rid, g in grammars.items()}, self)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = _llguidance_tokenizer(self.hf_tokenizer, self.vocab_size, self.eos_token_ids)
        return self._tokenizer

    @property
    def executor(self) -> Any:
        if self._executor is None:
            import llguidance
            self._executor = llguidance.LLExecutor(num_threads=self.threads)
        return self._executor

    def _template(self, grammar: str, requests: int = 1) -> "GrammarTemplate":
        """The grammar's compiled copies, enough for `requests` of one call: one per ROWS_PER_LEXER of them, at
        most `lexer_copies` (a job of many distinct grammars, one per row, compiles each once: their requests
        have lexers of their own already)."""
        want = max(1, min(self.lexer_copies, -(-requests // ROWS_PER_LEXER)))
        template = self._templates.get(grammar)
        if template is None or len(template.copies) < want:
            have = template.copies if template is not None else ()
            added = tuple(self._compile(grammar) for _ in range(want - len(have)))
            template = self._templates[grammar] = GrammarTemplate(have + added)
        return template

    def _compile(self, grammar: str) -> Any:
        """A matcher of its own for `grammar` (its own lexer and lock)."""
        import llguidance
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"constraint: the grammar does not build for this tokenizer: {matcher.get_error()}")
        return matcher


@dataclass(frozen=True, eq=False)
class GrammarTemplate:
    """One grammar compiled several times: up to one copy per mask thread.

    llguidance's `deep_copy` of a matcher shares the original's lexer, behind one lock (its `Parser` holds the
    lexer in an `Arc<Mutex<..>>` that `clone` shares), so the masks of requests copied from one matcher are
    computed one at a time whatever the thread count: on 2 CPU cores, 64 rows of bench.structured's review
    schema took the same time a step with 1 thread and with 2 (3.4 and 3.2 ms), and 1.7x less with 2 threads
    once the rows had lexers of their own; on the H200's 16 cores (12 threads) the masks of llama-1b's review
    job took 2.3-3.1x less wall time (BENCHMARKS.md).  So the requests of a grammar copy its `copies` in turn
    (the n-th request the n-th modulo their count), and a step hands the executor its rows grouped by copy:
    each thread's share of the rows then mostly takes one lock.  The copies are the same grammar, so a state
    (a token history) has one mask whichever copy computes it.
    """

    copies: tuple[Any, ...]


PARALLEL_ACCEPT_MIN_ROWS = 64
ROWS_PER_LEXER = 32  # a grammar's requests in one call per compiled copy of it (GrammarTemplate), at most one per thread


def mask_threads() -> int:
    """The executor's threads: llguidance's own default (80% of the cores, at most 32), made explicit so that
    each grammar gets as many compiled copies (`GrammarTemplate`)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(32, int(0.8 * cores)))


def _llguidance_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: list[int]) -> Any:
    from transformers import PreTrainedTokenizerFast
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(f"constraint: structured output needs a fast (Rust) Hugging Face tokenizer, "
                         f"got {type(tokenizer).__name__}")
    import llguidance.hf
    eos = eos_token_ids or [tokenizer.eos_token_id]
    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)


class TokenHistories:
    """Names a matcher's state by a node of a trie: its template, then the tokens it has consumed.

    llguidance is deterministic: two matchers copied from one template that consumed the same tokens are in
    the same state, so what depends only on the state (its forced tokens, its mask) is computed once per node
    and reused by every request that reaches it (forced tokens for the whole call, masks within a step; in a
    classification job, many requests walk the same keys, labels and separators).  The trie lives as long as
    one `generate` call and keeps at most `max_nodes` edges (some 150 bytes each); past that, a new state gets
    a node of its own that no other request can reach (correct, merely never shared).
    """

    def __init__(self, max_nodes: int = 1 << 18) -> None:
        self.max_nodes = max_nodes
        self._children: dict[tuple[int, int], int] = {}
        self._roots: dict[int, int] = {}  # id(template matcher) -> node
        self._count = 0

    def root(self, template: Any) -> int:
        node = self._roots.get(id(template))
        if node is None:
            node = self._roots[id(template)] = self._new()
        return node

    def walk(self, node: int, tokens: Sequence[int]) -> int:
        """The node reached from `node` by consuming `tokens`."""
        children = self._children
        for token in tokens:
            child = children.get((node, token))
            if child is None:
                child = self._new()
                if len(children) < self.max_nodes:
                    children[(node, token)] = child
            node = child
        return node

    def shared(self) -> bool:
        """Whether new nodes are still recorded (what is stored per node should stop when they are not)."""
        return len(self._children) < self.max_nodes

    def _new(self) -> int:
        self._count += 1
        return self._count - 1


class GrammarMatchers:
    """The grammar state of one `generate` call: a matcher per constrained request, made on first use.

    For each request, `accept` of its token n must come before `fill_mask` for its token n + 1.
    """

    def __init__(self, templates: dict[int, Any], compiler: GrammarCompiler):
        self._templates = templates
        self._matchers: dict[int, Any] = {}
        self._released: set[int] = set()  # finished: a row of theirs still in flight is unconstrained (discarded)
        self._pre_accepted: dict[int, int] = {}  # request id -> the forced token its step in flight must sample
        self._histories = TokenHistories()
        self._nodes: dict[int, int] = {}  # request id -> its matcher's node in _histories
        self._copy_of: dict[int, int] = {}  # request id -> the index of the grammar copy its matcher was copied from
        self._turns: dict[int, int] = {}  # id(template) -> the copy index its latest request got
        self._forced_runs: dict[int, list[int]] = {}  # node -> the state's fast-forward tokens ([]: none)
        self._compiler = compiler
        self._buffers: list[torch.Tensor] = []
        self._next_buffer = 0
        self.words = (compiler.vocab_size + 31) // 32
        self.masks_computed = 0  # rows whose mask the grammar library computed (bench.structured reports
        self.tokens_accepted = 0  # them per accepted token: 1.0 means a full mask for every constrained token)
        self.tokens_jumped = 0  # forced tokens appended by jump_forward (no mask, no step of their own)
        self.forced_runs_computed = 0  # states whose forced tokens the grammar library computed (the others
        self.forced_runs_reused = 0  # reused those of a request that reached the same state first)

    def constrained(self, request_id: int) -> bool:
        return request_id in self._templates and request_id not in self._released

    def fill_mask(self, request_ids: Sequence[int]) -> torch.Tensor | None:
        """The allowed tokens of each row's next token: host int32 [R, ceil(V/32)]; None if no row is constrained.

        The tensor is one of two buffers used in turn: copy it to the device before the call after next.
        """
        constrained = [(rid, row) for row, rid in enumerate(request_ids) if self.constrained(rid)]
        if not constrained:
            return None
        mask = self._buffer(len(request_ids))
        forced = [(row, self._pre_accepted[rid]) for rid, row in constrained if rid in self._pre_accepted]
        rows, copies = self._distinct_states([(rid, row) for rid, row in constrained if rid not in self._pre_accepted])
        self.masks_computed += len(rows)
        if len(constrained) < len(request_ids):
            mask.fill_(-1)
        if rows:  # llguidance.torch.fill_next_token_bitmask_par without its module, which imports torch.compile
            self._compiler.executor.unsafe_compute_mask_ptr(rows, mask.data_ptr(), self.words * 4, mask.shape[0])
        if copies:  # rows whose state an earlier row of the step has: the same mask
            source, target = np.array(copies, dtype=np.int64).T
            words = mask.numpy()
            words[target] = words[source]
        if forced:
            _one_token_rows(mask, forced)
        return mask

    def _distinct_states(self, pending: list[tuple[int, int]]) -> tuple[list[tuple[Any, int]], list[tuple[int, int]]]:
        """(matcher, row) for the first row of each state among (request id, row) pairs; (its row, row) for the
        others (a mask is a function of the state: one per state)."""
        if not self._compiler.reuse_by_state:
            rows, copies = [(rid, self._matcher(rid), row) for rid, row in pending], []
        else:
            rows, copies, first = [], [], {}
            for rid, row in pending:
                matcher = self._matcher(rid)
                node = self._nodes[rid]
                source = first.get(node)
                if source is None:
                    first[node] = row
                    rows.append((rid, matcher, row))
                else:
                    copies.append((source, row))
        return [rows[i][1:] for i in self._copy_order([rid for rid, _, _ in rows])], copies

    def jump_forward(self, rows: Sequence[tuple[int, int, frozenset]]) -> dict[int, list[int]]:
        """Consume each request's forced run of tokens; the runs, by request id (see the module docstring).

        rows: (request id, room, stop ids) for the requests of the step about to be sampled, after `accept`
        of their previous token: room is how many tokens the run may have (0: none); a run never includes
        a stop id nor the token that completes the grammar.  The runs' first tokens are pre-accepted.
        """
        runs = {}
        for rid, room, stop_ids in rows:
            if room <= 0 or not self.constrained(rid):
                continue
            matcher = self._matcher(rid)
            node = self._nodes[rid]
            forced = self._forced_runs.get(node) if self._compiler.reuse_by_state else None
            if forced is None:  # compute_ff_bytes: about 1 us, most rows are not forced; the tokens cost 20-50
                forced = matcher.compute_ff_tokens() if matcher.compute_ff_bytes() else []
                if self._histories.shared():
                    self._forced_runs[node] = forced
                self.forced_runs_computed += 1
            else:
                self.forced_runs_reused += 1
            run = _until_stop(forced[:room], stop_ids)
            taken = matcher.try_consume_tokens(run) if run else 0
            if taken and matcher.is_stopped():  # the grammar's last token stays a sampled one
                matcher.rollback(1)
                taken -= 1
            if taken:
                runs[rid] = run[:taken]
                self._nodes[rid] = self._histories.walk(node, run[:taken])
                self._pre_accepted[rid] = run[0]
                self.tokens_jumped += taken - 1
        return runs

    def accept(self, request_ids: Sequence[int], tokens: Sequence[int]) -> list[int]:
        """Advance each constrained request's grammar by its token; the ids whose grammar has ended.

        A token the grammar refuses (one sampled without its mask) ends the grammar too.  The rows that are
        not pre-accepted consume their tokens one by one (a few us each), or through the executor's thread pool
        where `parallel_accept` is set and there are enough of them (measured slower on the H200: see __init__).
        """
        ended: dict[int, bool] = {}  # request id -> ended, in row order
        consumed = []  # (request id, matcher, token) for the rows the grammar must advance
        for rid, token in zip(request_ids, tokens):
            if self.constrained(rid):
                self.tokens_accepted += 1
                expected = self._pre_accepted.pop(rid, None)
                if expected is not None:  # consumed by jump_forward; its one-token mask made the device agree
                    ended[rid] = int(token) != expected
                else:
                    ended[rid] = False
                    consumed.append((rid, self._matcher(rid), int(token)))
        if len(consumed) < PARALLEL_ACCEPT_MIN_ROWS or not self._compiler.parallel_accept:
            accepted = [matcher.consume_token(token) for _, matcher, token in consumed]
        else:  # grouped by lexer copy, as fill_mask's rows are, then put back in row order
            order = self._copy_order([rid for rid, _, _ in consumed])
            results = self._compiler.executor.consume_token_par([consumed[i][1:] for i in order])
            accepted = [False] * len(consumed)
            for i, ok in zip(order, results):
                accepted[i] = ok
        nodes, walk = self._nodes, self._histories.walk
        for (rid, matcher, token), ok in zip(consumed, accepted):
            ended[rid] = not ok or matcher.is_stopped()
            if ok:
                nodes[rid] = walk(nodes[rid], (token,))
        return [rid for rid, done in ended.items() if done]

    def release(self, request_ids: Sequence[int]) -> None:
        """Drop the matchers of finished requests (their memory; a later call would start them over)."""
        for rid in request_ids:
            self._matchers.pop(rid, None)
            self._nodes.pop(rid, None)
            self._copy_of.pop(rid, None)
            self._pre_accepted.pop(rid, None)
            self._released.add(rid)

    def _matcher(self, request_id: int) -> Any:
        matcher = self._matchers.get(request_id)
        if matcher is None:
            template = self._templates[request_id]
            turn = self._turns[id(template)] = self._turns.get(id(template), -1) + 1
            self._copy_of[request_id] = copy = turn % len(template.copies)
            matcher = self._matchers[request_id] = template.copies[copy].deep_copy()
            self._nodes[request_id] = self._histories.root(template)
        return matcher

    def _copy_order(self, request_ids: Sequence[int]) -> list[int]:
        """Positions of `request_ids` grouped by the grammar copy each request's matcher came from: handed to the
        executor in this order, each thread's share of the rows mostly takes one lexer's lock (GrammarTemplate)."""
        copy_of = self._copy_of
        return sorted(range(len(request_ids)), key=lambda i: copy_of[request_ids[i]])

    def _buffer(self, rows: int) -> torch.Tensor:
        if len(self._buffers) < 2 or self._buffers[0].shape[0] < rows:
            size = max(rows, 2 * self._buffers[0].shape[0] if self._buffers else 64)
            self._buffers = [torch.empty((size, self.words), dtype=torch.int32, pin_memory=self._compiler.pin_memory)
                             for _ in range(2)]
        buffer = self._buffers[self._next_buffer]
        self._next_buffer ^= 1
        return buffer[:rows]


def _until_stop(run: list[int], stop_ids: frozenset) -> list[int]:
    """The run up to its first stop id (which must be sampled, to end the request as any stop id does)."""
    for i, token in enumerate(run):
        if token in stop_ids:
            return run[:i]
    return run


def _one_token_rows(mask: torch.Tensor, rows: list[tuple[int, int]]) -> None:
    """Mask rows that allow one token each: (row, token) pairs (most rows of a step, in a JSON schema)."""
    words = mask.numpy().view(np.uint32)
    index, tokens = np.array(rows, dtype=np.int64).T
    words[index] = 0
    words[index, tokens >> 5] = np.left_shift(1, tokens & 31).astype(np.uint32)
