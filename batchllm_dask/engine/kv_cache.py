"""Page ids of the paged KV pool: who holds which pages, and how many there are.

The pool itself (torch tensors) lives in the runner; this module only counts.
There is no LRU and no reference counting by hash: a shared prefix owns its
pages from its prefill until its last request retires, and the scheduler frees
them then (explicit lifetimes, BatchLLM section 3).  Pure Python: no torch.
"""
from __future__ import annotations


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages needed to hold `num_tokens` tokens."""
    return -(-num_tokens // page_size)


def kv_bytes_per_page(page_size: int, num_layers: int, num_kv_heads: int, head_dim: int,
                      dtype_bytes: int) -> int:
    """Bytes of one page across all layers, keys and values."""
    return 2 * num_layers * page_size * num_kv_heads * head_dim * dtype_bytes


def kv_shortage_message(need_pages: int, pool_pages: int, page_bytes: int) -> str:
    """Why a request can never run: the KV memory it needs against the pool's, in pages and MiB."""
    mib = lambda pages: pages * page_bytes / 2**20  # noqa: E731
    return (f"prompt plus max_tokens needs {need_pages} KV pages ({mib(need_pages):,.1f} MiB of KV memory) but the "
            f"whole KV cache is {pool_pages} pages ({mib(pool_pages):,.1f} MiB): lower max_tokens, shorten the "
            f"prompt, or give the engine more KV memory (kv_cache_bytes / kv_cache_fraction)")


class OutOfPages(RuntimeError):
    """The pool has fewer free pages than asked for."""


class PageAllocator:
    """A free list of page ids, with the high-water mark of pages in use.

    Ids are handed out lowest first, and a freed page is handed out again before any page never used (the last
    freed first).  The pages never handed out are a counter, not a list: listing a pool of 236k pages (llama-1b
    on an H200) took 8 ms of a 2-core CI machine's CPU at every `generate` call, before the GPU's first step.
    """

    def __init__(self, num_pages: int):
        if num_pages < 1:
            raise ValueError(f"the KV pool needs at least one page, got {num_pages}")
        self.num_pages = num_pages
        self._returned: list[int] = []  # freed pages; the last one freed is at the end
        self._fresh = 0  # pages [_fresh, num_pages) were never handed out
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self._returned) + self.num_pages - self._fresh

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise OutOfPages(f"asked for {n} pages, {self.num_free} free")
        reused = min(n, len(self._returned))
        cut = len(self._returned) - reused
        pages = self._returned[cut:][::-1]
        del self._returned[cut:]
        pages.extend(range(self._fresh, self._fresh + n - reused))
        self._fresh += n - reused
        self.peak_used = max(self.peak_used, self.num_used)
        return pages

    def free(self, pages: list[int]) -> None:
        self._returned.extend(reversed(pages))
