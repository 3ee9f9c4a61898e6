"""Batches read and placed on the devices ahead of the step that uses them.

The batch at step s is a pure function of (seed, s), so reading it early changes nothing but
when the work happens: `Prefetcher(fetch, depth)` runs `fetch(s + 1) ... fetch(s + depth)` on a
background thread while step s runs (the compiled step releases the GIL), and `__call__(s)`
returns fetch(s), from the queue when it was asked for in order.
"""
from __future__ import annotations

import concurrent.futures
from typing import Callable


class Prefetcher:
    def __init__(self, fetch: Callable[[int], dict], depth: int = 1):
        self.fetch, self.depth = fetch, depth
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self.ahead: dict[int, concurrent.futures.Future] = {}

    def __call__(self, step: int) -> dict:
        future = self.ahead.pop(step, None)
        for s in list(self.ahead):  # a jump (a resume elsewhere): what was read ahead is stale
            if s < step or s > step + self.depth:
                self.ahead.pop(s).cancel()
        batch = future.result() if future is not None else self.fetch(step)
        for s in range(step + 1, step + 1 + self.depth):
            if s not in self.ahead:
                self.ahead[s] = self.pool.submit(self.fetch, s)
        return batch

    def close(self) -> None:
        for f in self.ahead.values():
            f.cancel()
        self.pool.shutdown(wait=True)
        self.ahead = {}
