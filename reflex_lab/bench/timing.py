"""Interleaved wall-clock timing and the resident-memory peak of a call."""
from __future__ import annotations

import os
import resource
import statistics
import threading
import time
from typing import Any, Callable, Sequence


# A call that raised the process's peak resident memory by more than this grew the heap: it paid
# for fresh pages (with the malloc tuning's huge pages, 2 MiB zeroed, and compacted where memory is
# fragmented), which can double a step's wall time, while the steady step of a training run reuses
# its heap. Contenders sharing one process's heap make it grow now and then, long after warm-up.
HEAP_GROWTH_BYTES = 128 << 20
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def steal_ticks() -> int:
    """The machine's CPU time taken by the hypervisor so far (/proc/stat 'steal', in clock ticks;
    0 where unknown): time this virtual machine's cores were runnable but not running."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) if fields[0] == "cpu" and len(fields) > 8 else 0
    except (OSError, ValueError):
        return 0


def interleaved(fns: dict[str, Callable[[], Any]], reps: int,
                log: Callable[[str], None] = lambda s: None,
                warmup_rounds: int = 0, growth: dict | None = None,
                steal: dict | None = None) -> dict[str, list[float]]:
    """Wall seconds of `reps` calls of every fn, alternating the order (A B C, C B A, ...), after
    `warmup_rounds` untimed rounds (caches; with the malloc tuning, the heap grows until it holds
    every contender's buffers, so the first rounds in one process are not steady). With `growth`
    (a dict), growth[name] gets by how many bytes each timed call raised the process's peak
    resident memory (see steady_pairs); with `steal`, steal[name] gets the seconds of CPU the
    hypervisor took from this machine's cores during each call (a shared host's noise)."""
    names = list(fns)
    for _ in range(warmup_rounds):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            p0, s0, t0 = peak_rss_bytes(), steal_ticks(), time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
            grew = peak_rss_bytes() - p0
            if growth is not None:
                growth.setdefault(n, []).append(grew)
            if steal is not None:
                steal.setdefault(n, []).append((steal_ticks() - s0) / TICKS_PER_S)
            log(f"  rep {r + 1}/{reps} {n}: {times[n][-1]:.3f} s"
                + (f" (the heap grew by {grew >> 20} MiB)" if grew > HEAP_GROWTH_BYTES else ""))
    return times


def steady_pairs(growth_a: Sequence[int] | None, growth_b: Sequence[int] | None) -> list[bool] | None:
    """Per round, whether neither side's call grew the heap (None without growth figures)."""
    if growth_a is None or growth_b is None:
        return None
    return [a <= HEAP_GROWTH_BYTES and b <= HEAP_GROWTH_BYTES for a, b in zip(growth_a, growth_b)]


def steady_median(times: Sequence[float], growth: Sequence[int] | None) -> float:
    """The median of the calls that did not grow the heap (of all, if every call did)."""
    keep = [t for t, g in zip(times, growth or [0] * len(times)) if g <= HEAP_GROWTH_BYTES]
    return median(keep or times)


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
