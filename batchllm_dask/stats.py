"""What a job did, from its result columns: `JobStats` (the CLI's summary, `out.llm.stats()` in Python).

Every figure comes from the completion columns themselves, so it is the same
whatever ran the job (pandas, Dask, a re-read output file): rows, errors by
kind, prompt tokens, prompt tokens actually computed (`prompt_tokens -
cached_tokens`: each shared prefix counted once per partition) and the share
that prefix sharing saved, output tokens; wall time and tokens/s when the
caller timed the run.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

COLUMNS = ["prompt_tokens", "cached_tokens", "completion_tokens", "finish_reason", "error"]


def error_kind(message: str) -> str:
    """A short name for an error message: its first clause, without numbers (so counts group by kind)."""
    head = re.split(r"[:;(]", str(message), maxsplit=1)[0].strip()
    return re.sub(r"\d+", "N", head)[:60] or "error"


@dataclass(frozen=True)
class JobStats:
    """Counters of one generation job (all token counts are sums over its rows)."""

    rows: int
    errors: dict[str, int] = field(default_factory=dict)  # kind -> rows
    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0  # after prefix sharing
    output_tokens: int = 0
    wall_seconds: float | None = None

    @property
    def failed_rows(self) -> int:
        return sum(self.errors.values())

    @property
    def saved_share(self) -> float:
        """Share of the prompt tokens that prefix sharing did not have to compute."""
        return 1 - self.computed_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def tokens_per_second(self) -> float | None:
        """Output tokens per second of wall time (None when the run was not timed)."""
        return self.output_tokens / self.wall_seconds if self.wall_seconds else None

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, wall_seconds: float | None = None) -> "JobStats":
        """The stats of a computed result (pandas) with the completion columns."""
        missing = [c for c in COLUMNS if c not in frame.columns]
        if missing:
            raise KeyError(f"not a generate() result: columns {missing} are missing")
        failed = frame["finish_reason"] == "error"
        kinds = Counter(error_kind(m) for m in frame.loc[failed, "error"].fillna("error"))
        prompt = int(frame["prompt_tokens"].sum())
        return cls(rows=len(frame), errors=dict(kinds.most_common()), prompt_tokens=prompt,
                   computed_prompt_tokens=prompt - int(frame["cached_tokens"].sum()),
                   output_tokens=int(frame["completion_tokens"].sum()), wall_seconds=wall_seconds)

    def __str__(self) -> str:
        rows = [("rows", f"{self.rows:,} ({self.rows - self.failed_rows:,} completed, {self.failed_rows:,} errors)")]
        rows += [(f"  {n:,} x", kind) for kind, n in self.errors.items()]
        rows += [("prompt tokens", f"{self.prompt_tokens:,}"),
                 ("computed after sharing", f"{self.computed_prompt_tokens:,} (prefix sharing saved {self.saved_share:.1%})"),
                 ("output tokens", f"{self.output_tokens:,}")]
        if self.wall_seconds is not None:
            rows.append(("wall time", f"{self.wall_seconds:.2f} s ({self.tokens_per_second:,.1f} output tokens/s)"))
        return "\n".join(f"{label:<23}{value}" for label, value in rows)


def job_stats(result: Any, wall_seconds: float | None = None) -> JobStats:
    """`JobStats` of a pandas or Dask result (a Dask one computes only the columns the stats need)."""
    if not isinstance(result, pd.DataFrame):
        result = result[COLUMNS].compute()
    return JobStats.from_frame(result, wall_seconds)
