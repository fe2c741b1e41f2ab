"""What `Engine.generate` returns: one `Completion` per prompt, and the call's `GenerationStats`."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Completion:
    """The result for one prompt.

    finish_reason: "stop" (EOS, a stop string or stop token), "length"
    (max_tokens or the model's context reached) or "error" (then `error` says
    why and the other fields are empty).
    cached_tokens: prompt tokens this request read from shared prefixes that
    another request of the batch computed (each shared prefix is counted as
    computed by the first request in run order below it, cached for the rest),
    so prompt_tokens - cached_tokens summed over a batch is its computed prompt
    tokens (before any recomputation after preemption).
    text: None when the engine has no tokenizer (a weights-only checkpoint without
    the `tokenizer` option): the completion is its `token_ids` only.
    """

    index: int
    text: str | None = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    cached_tokens: int = 0


@dataclass(frozen=True)
class GenerationStats:
    """Counters of one `generate` call.

    computed_prompt_tokens counts each shared prefix once (plus recomputation
    after preemption, also given alone as recomputed_tokens); mean_tokens_per_step
    is the mean number of tokens in a forward pass.
    """

    requests: int
    failed_requests: int
    prompt_tokens: int
    computed_prompt_tokens: int
    output_tokens: int
    shared_prefixes: int
    steps: int
    mean_tokens_per_step: float
    peak_kv_pages: int
    kv_pages: int
    preemptions: int
    recomputed_tokens: int
    seconds: float
    oom_retries: int = 0  # steps launched again with half the token budget after a CUDA out-of-memory error
    wait_seconds: float = 0.0  # the host blocked on the device; the rest of `seconds` is host work

    @property
    def host_seconds(self) -> float:
        """Host time not spent waiting on the device (scheduling, inputs, launches, stop checks)."""
        return self.seconds - self.wait_seconds

    @property
    def output_tokens_per_second(self) -> float:
        return self.output_tokens / self.seconds if self.seconds > 0 else 0.0
