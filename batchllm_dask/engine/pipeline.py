"""The host one step ahead of the GPU: placeholders for sampled tokens, and what is done when they arrive.

The engine launches step n+1 before it knows the tokens step n samples (engine.py):

1. When a step is launched, every request it samples gets a placeholder token
   (`mark_sampled`): its length, positions and KV pages are known, only the
   token id is not.  The next step's decode of that request takes the id from
   the device (step_inputs.py's feed).  A request whose placeholder is its
   last token (max_tokens, or the model's context, reached) is DRAINING: it
   gets no more steps.
2. When the tokens arrive, one step late (`resolve`), each placeholder gets its
   id and the stop rules run on it: EOS, stop token ids, stop strings, and
   DRAINING's end.  A request that stopped on EOS or a stop string was already
   scheduled into the step in flight: that row is wasted (its KV write lands in
   pages nothing reads again), its token is dropped, never a wrong token kept.

The per-request work of both is array operations over the requests' rows of the scheduler's
`RequestTable` (the DRAINING test, feed indices, which tokens may stop their request) and `map`s in C
over the requests for what lives on them (their token lists, `unresolved`); only the few rows that may
end take a Python path of their own.  Pure Python and numpy: no torch.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import partial
from itertools import compress, repeat
from operator import attrgetter, is_, setitem
from typing import TYPE_CHECKING, Callable

import numpy as np

from .request_table import RequestTable
from .sequence import RequestSeq, Status
from .step_inputs import PLACEHOLDER

if TYPE_CHECKING:
    from .sampler import StopChecker
    from .structured import GrammarMatchers


@dataclass(frozen=True)
class SampledStep:
    """The requests one step samples, in its row order, and where each one's placeholder is."""

    seqs: list[RequestSeq]
    positions: list[int]  # index of the placeholder in seq.tokens
    table: RequestTable | None = None  # the scheduler's table, which held every one of them when marked
    slots: np.ndarray | None = None  # [len(seqs)] int64: their slots in it then


def mark_sampled(seqs: list[RequestSeq], max_model_len: int) -> SampledStep:
    """Give each sampled request a placeholder; mark the ones whose placeholder is their last token.

    The requests are running (admitted, `seq.table`): the DRAINING test is over the table's columns, and
    the table keeps each one's feed index (step_inputs.py reads it there)."""
    n = len(seqs)
    table = seqs[0].table if n else None
    if table is None:
        return SampledStep(seqs, [])
    tokens = list(map(_tokens, seqs))
    _consume(map(list.append, tokens, repeat(PLACEHOLDER)))
    _consume(map(setattr, seqs, repeat("unresolved"), (_gather(_unresolved, seqs) + 1).tolist()))
    slots = _gather(_slot, seqs)
    lengths = _gather(len, tokens)
    table.feed_index[slots] = np.arange(n)
    drain = (lengths - table.num_prompt[slots] >= table.max_tokens[slots]) | (table.start[slots] + lengths >= max_model_len)
    if drain.any():
        table.draining[slots[drain]] = True
        for i in np.flatnonzero(drain).tolist():
            seqs[i].status = Status.DRAINING
    return SampledStep(seqs, (lengths - 1).tolist(), table, slots)


def resolve(step: SampledStep, values: list[int], stop_checker: StopChecker,
            finish: Callable[[RequestSeq], None], grammars: GrammarMatchers | None = None) -> None:
    """Fill the step's placeholders with the sampled ids; `finish` every request that ended on one.

    grammars: structured output's matchers, advanced by the tokens of their requests (a grammar that is
    complete ends its request, reason "stop").

    The requests still in the slots they were marked in are filled at once, and only those whose token
    may end them (stop strings, a stop id, DRAINING: from the table) are checked one by one; the others
    (finished or preempted since, few) and steps with grammars take the per-request path.
    """
    seqs, table, slots = step.seqs, step.table, step.slots
    if grammars or table is None or not seqs:
        return _resolve_each(step.seqs, step.positions, values, stop_checker, finish, grammars)
    same = np.fromiter(map(is_, table.seqs[slots].tolist(), seqs), dtype=bool, count=len(seqs))
    tokens = np.asarray(values, dtype=np.int64)
    may_end = (table.stop_strings[slots] | table.draining[slots] | table.many_stop_ids[slots]
               | (table.stop_ids[slots] == tokens[:, None]).any(axis=1))
    if same.all():
        fast, positions = seqs, step.positions
    else:  # some ended on the step before, or were preempted: the per-request path, in row order
        keep = same.tolist()
        fast, positions, values = [list(compress(xs, keep)) for xs in (seqs, step.positions, values)]
        may_end |= ~same
    _consume(map(setitem, map(_tokens, fast), positions, values))
    _consume(map(setattr, fast, repeat("unresolved"), (_gather(_unresolved, fast) - 1).tolist()))
    for i in np.flatnonzero(may_end).tolist():
        seq, pos, token = seqs[i], step.positions[i], int(tokens[i])
        if same[i]:
            _end_if_stopped(seq, pos, token, stop_checker, finish, False)
        else:
            _resolve_each([seq], [pos], [token], stop_checker, finish, None)


def _resolve_each(seqs: list[RequestSeq], positions: list[int], values: list[int], stop_checker: StopChecker,
                  finish: Callable[[RequestSeq], None], grammars: GrammarMatchers | None) -> None:
    """`resolve` one request at a time (a request that ended on the step before is skipped: its row was
    wasted)."""
    live = [(seq, pos, token) for seq, pos, token in zip(seqs, positions, values)
            if seq.status is not Status.FINISHED]
    ended = set(grammars.accept([s.index for s, _, _ in live], [t for _, _, t in live])) if grammars else ()
    draining = Status.DRAINING
    for seq, pos, token in live:
        seq.tokens[pos] = token
        seq.unresolved -= 1
        if not (seq.params.stop or token in seq.stop_ids or seq.status is draining or ended):
            continue  # the common case: nothing can end it on this token (what `_stop_reason` finds then)
        _end_if_stopped(seq, pos, token, stop_checker, finish, seq.index in ended)


def _end_if_stopped(seq: RequestSeq, pos: int, token: int, stop_checker: StopChecker,
                    finish: Callable[[RequestSeq], None], grammar_ended: bool) -> None:
    reason = _stop_reason(seq, pos, token, stop_checker, grammar_ended)
    if reason is not None:
        del seq.tokens[pos + 1:]  # a placeholder of the step in flight, if any
        seq.unresolved = 0
        seq.finish_reason = reason
        finish(seq)


def _stop_reason(seq: RequestSeq, pos: int, token: int, stop_checker: StopChecker,
                 grammar_ended: bool) -> str | None:
    """Why the request ends on its token at `pos` ("stop" or "length"), or None."""
    if seq.params.stop:  # stop strings need the text: the checker's whole decision
        decision = stop_checker.check(seq.tokens[seq.num_prompt:pos + 1], seq.params, grammar_ended)
        if decision.finished:
            seq.text = decision.text if decision.matched in seq.params.stop else None
            return decision.reason
    elif token in seq.stop_ids or grammar_ended:
        return "stop"
    last = seq.status is Status.DRAINING and pos == len(seq.tokens) - 1
    return "length" if last else None


_tokens = attrgetter("tokens")
_unresolved = attrgetter("unresolved")
_slot = attrgetter("slot")
_consume = partial(deque, maxlen=0)  # runs an iterator (a `map` of setters, in C) to its end


def _gather(getter: Callable, seqs: list) -> np.ndarray:
    """getter(seq) of every seq as an int64 array, read in C."""
    return np.fromiter(map(getter, seqs), dtype=np.int64, count=len(seqs))
