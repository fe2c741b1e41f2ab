"""Jump-forward for structured output: a grammar's forced tokens join the request without steps of their own.

A JSON schema forces much of its text: keys, the quotes, colons and commas around them, the rest of an
enum value once its first token is chosen.  Decoded a token a step, each of those tokens costs a forward
pass and a grammar mask, though nothing is chosen.  Here, when a constrained row is about to be sampled
(its forward pass in flight, its previous token just accepted), the grammar's forced run is taken at
once (`GrammarMatchers.jump_forward`):

- its first token is what this step samples: the row's mask allows only that token;
- the host writes that token over the row's placeholder and appends the rest of the run to the request
  as known tokens; the scheduler computes them in the next step as one chunk (a prefill chunk of the
  request's own tokens), whose last row is sampled under the grammar's next mask.

So a run of n forced tokens costs one step instead of n, and no masks.  The room a run may take keeps
every request's end where it was: at least one token of max_tokens and of the context is left to be
sampled after the run, and the run fits in the pages the request holds or has reserved (it never takes
pages from another request).  A request with stop strings gets no jumps (their check needs each token's
text as it is sampled).

The output is the grammar's canonical tokenization of the forced text (llguidance's fast-forward
tokens), where token-by-token decoding would let the model pick among other tokenizations of the same
text; the text, and so its validity, is the same.
"""
from __future__ import annotations

from .scheduler import Scheduler
from .sequence import RequestSeq, Status
from .structured import GrammarMatchers


def run_room(seq: RequestSeq, position: int, max_model_len: int, page_size: int) -> int:
    """Tokens a forced run may give `seq` from its placeholder at `position` on (0: no jump).

    The placeholder's own token, then appended ones that leave room for one more sampled token.
    """
    if seq.status is not Status.RUNNING or seq.params.stop or position != len(seq.tokens) - 1:
        return 0
    length = len(seq.tokens)
    appended = min(seq.params.max_tokens - 1 - (length - seq.num_prompt),  # a sampled token left of max_tokens
                   max_model_len - 1 - (seq.start + length),  # and of the context
                   (len(seq.pages) + seq.reserved_pages) * page_size - length)  # its own pages
    return 1 + max(0, appended)


def jump_forward(seqs: list[RequestSeq], positions: list[int], matchers: GrammarMatchers, scheduler: Scheduler,
                 max_model_len: int) -> int:
    """Take the forced runs of the requests about to be sampled (`seqs`, placeholders at `positions`).

    Returns the number of tokens appended.
    """
    page_size = scheduler.page_size
    rows = [(seq.index, run_room(seq, pos, max_model_len, page_size), seq.stop_ids)
            for seq, pos in zip(seqs, positions) if matchers.constrained(seq.index)]
    runs = matchers.jump_forward(rows)
    appended = 0
    for seq, pos in zip(seqs, positions):
        run = runs.get(seq.index)
        if run is None:
            continue
        seq.tokens[pos] = run[0]  # what the device samples under its one-token mask
        if len(run) > 1:
            seq.tokens.extend(run[1:])
            scheduler.extend(seq)
            appended += len(run) - 1
    return appended
