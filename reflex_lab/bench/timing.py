"""Interleaved wall-clock timing and the resident-memory peak of a call."""
from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Any, Callable, Sequence


def interleaved(fns: dict[str, Callable[[], Any]], reps: int,
                log: Callable[[str], None] = lambda s: None,
                warmup_rounds: int = 0) -> dict[str, list[float]]:
    """Wall seconds of `reps` calls of every fn, alternating the order (A B C, C B A, ...), after
    `warmup_rounds` untimed rounds (caches; with the malloc tuning, the heap grows until it holds
    every contender's buffers, so the first rounds in one process are not steady)."""
    names = list(fns)
    for _ in range(warmup_rounds):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
            log(f"  rep {r + 1}/{reps} {n}: {times[n][-1]:.3f} s")
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak_during(fn: Callable[[], Any], interval: float = 0.002) -> tuple[Any, int]:
    """(fn(), peak resident memory above the level before the call, in bytes; sampled; -1 where
    the process's memory cannot be read)."""
    try:
        base = _rss_bytes()
    except OSError:
        return fn(), -1
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(interval)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        out = fn()
    finally:
        stop.set()
        t.join()
    peak[0] = max(peak[0], _rss_bytes())
    return out, peak[0] - base
