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

Pure Python: no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

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


def mark_sampled(seqs: list[RequestSeq], max_model_len: int) -> SampledStep:
    """Give each sampled request a placeholder; mark the ones whose placeholder is their last token."""
    positions = []
    draining = Status.DRAINING
    for i, seq in enumerate(seqs):
        tokens = seq.tokens
        tokens.append(PLACEHOLDER)
        seq.unresolved += 1
        seq.feed_index = i
        length = len(tokens)
        positions.append(length - 1)
        if length - seq.num_prompt >= seq.params.max_tokens or seq.start + length >= max_model_len:
            seq.status = draining
            seq.table.draining[seq.slot] = True  # (the scheduler's decode pass reads it there)
    return SampledStep(seqs, positions)


def resolve(step: SampledStep, values: list[int], stop_checker: StopChecker,
            finish: Callable[[RequestSeq], None], grammars: GrammarMatchers | None = None) -> None:
    """Fill the step's placeholders with the sampled ids; `finish` every request that ended on one.

    grammars: structured output's matchers, advanced by the tokens of their requests (a grammar that is
    complete ends its request, reason "stop").
    """
    live = [(seq, pos, token) for seq, pos, token in zip(step.seqs, step.positions, values)
            if seq.status is not Status.FINISHED]  # a request that ended on the step before: its row was wasted
    ended = set(grammars.accept([s.index for s, _, _ in live], [t for _, _, t in live])) if grammars else ()
    draining = Status.DRAINING
    for seq, pos, token in live:
        seq.tokens[pos] = token
        seq.unresolved -= 1
        if not (seq.params.stop or token in seq.stop_ids or seq.status is draining or ended):
            continue  # the common case: nothing can end it on this token (what `_stop_reason` finds then)
        reason = _stop_reason(seq, pos, token, stop_checker, seq.index in ended)
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
