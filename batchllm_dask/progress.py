"""Progress of a job across Dask workers: every process counts its finished rows and output tokens.

The partition runner passes `count` as the engine's per-row progress callback
(`Engine.generate(..., progress=count)`), so the counts grow while a partition
generates, not only when it ends.  `JobProgress` (the CLI's bar) polls the
counts of every worker with `client.run(counters)` (or this process's, with no
cluster) and draws one tqdm bar: rows finished of rows in, output tokens/s.
The counters only grow; a bar reads them at its start and shows the difference.
"""
from __future__ import annotations

import threading
import time
from typing import Any

_lock = threading.Lock()
_rows = 0
_tokens = 0


def count(rows: int, output_tokens: int) -> None:
    """Record `rows` finished rows that produced `output_tokens` tokens in this process."""
    global _rows, _tokens
    with _lock:
        _rows += rows
        _tokens += output_tokens


def counters() -> tuple[int, int]:
    """(rows, output tokens) finished in this process so far."""
    with _lock:
        return _rows, _tokens


def total_counters(client: Any = None) -> tuple[int, int]:
    """The sums of `counters()` over every worker of `client`, or this process's counters without one."""
    if client is None:
        return counters()
    per_worker = client.run(counters).values()
    return sum(r for r, _ in per_worker), sum(t for _, t in per_worker)


class JobProgress:
    """A tqdm bar of rows finished (of `total` rows) and output tokens/s, updated by a polling thread.

        with JobProgress(total_rows, client):
            out.to_parquet(path)
    """

    def __init__(self, total: int, client: Any = None, interval: float = 0.5, disable: bool = False) -> None:
        self.total, self.client, self.interval, self.disable = total, client, interval, disable
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "JobProgress":
        from tqdm.auto import tqdm
        self._base = total_counters(self.client)
        self._start = time.perf_counter()
        self.bar = tqdm(total=self.total, unit="row", desc="generate", disable=self.disable, dynamic_ncols=True)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()

    def refresh(self) -> None:
        try:
            rows, tokens = total_counters(self.client)
        except Exception:  # noqa: BLE001 - a worker going away must not stop the job, only one update
            return
        rows, tokens = rows - self._base[0], tokens - self._base[1]
        seconds = max(time.perf_counter() - self._start, 1e-9)
        self.bar.n = min(rows, self.total)
        self.bar.set_postfix_str(f"{tokens / seconds:,.1f} tok/s", refresh=False)
        self.bar.refresh()

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc[0] is None:
            self.refresh()
        self.bar.close()
