"""glibc malloc settings for training on CPU: the CLIs restart themselves once, before JAX is
imported, with GLIBC_TUNABLES that (1) keep freed memory in the process and (2) back large
buffers with transparent huge pages.

Why: XLA:CPU allocates a train step's temporary buffer (1.0 GiB for bench.py's default config)
afresh on every step. By default glibc serves it with mmap and returns it with munmap, so the
kernel hands out and zeroes ~290k fresh 4 KiB pages per step: a fifth of a core in the kernel;
the bf16 step of the benchmark config takes 2.44-2.63 s instead of 2.10-2.15 s on 2 cores. Huge
pages alone cut the faults but not the churn: interleaved with PyTorch in one process (in a VM
that hands freed memory back to its host) the step took 2.9-3.1 s. With all four settings the
buffer is reused from the heap: no page faults once the heap has grown (docs/bench.md).

What it costs: the process keeps its peak heap until it exits (fine for a training run), and
all threads share one malloc arena. glibc reads tunables only when a process starts, hence the
restart (`os.execve`: same pid, same arguments). Opt out with REFLEX_TUNE_MALLOC=0; a
GLIBC_TUNABLES that already sets any glibc.malloc tunable is left alone.
"""
from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

TUNABLES = ("glibc.malloc.hugetlb=1",  # madvise(MADV_HUGEPAGE) on the heap's large mappings
            "glibc.malloc.mmap_max=0",  # large blocks come from the heap, not from mmap/munmap
            "glibc.malloc.arena_max=1",  # ...from one heap (other arenas mmap blocks > 64 MiB)
            "glibc.malloc.trim_threshold=68719476736")  # and stay there: never trimmed (64 GiB)
OPT_OUT = "REFLEX_TUNE_MALLOC"               # "0": never restart
RESTARTED = "REFLEX_TUNE_MALLOC_RESTARTED"  # set in the restarted process: restart at most once
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_SETTING) -> Optional[str]:
    """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> Optional[tuple[int, int]]:
    """(major, minor) of the running glibc, None on other C libraries."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, OSError, ValueError):
        return None


def restart_env(environ: Mapping[str, str], glibc: Optional[tuple[int, int]],
                thp: Optional[str]) -> Optional[dict]:
    """The environment to restart with, or None to run as is."""
    if environ.get(OPT_OUT) == "0" or environ.get(RESTARTED):
        return None
    if glibc is None or glibc < (2, 35):  # glibc.malloc.hugetlb appeared in 2.35
        return None
    if thp not in ("madvise", "always"):  # without huge pages, measured: no gain
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:  # the user tuned malloc already
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(([tunables] if tunables else []) + list(TUNABLES))
    env[RESTARTED] = "1"
    return env


def tune_malloc() -> None:
    """Restart this process with the settings above where they apply (see the module docstring);
    otherwise return and change nothing. Call it first thing in a CLI's `__main__` block:
    everything before the call runs twice."""
    if not sys.platform.startswith("linux"):
        return
    env = restart_env(os.environ, glibc_version(), thp_mode())
    if env is None:
        return
    argv = [sys.executable] + list(getattr(sys, "orig_argv", [sys.executable] + sys.argv)[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:  # cannot re-run the interpreter: carry on with glibc's defaults
        return
