"""The CLIs' restart with tuned glibc malloc (reflex_jax/malloc_tuning.py): when it restarts,
that it restarts once and keeps the process, and that a large buffer then really takes huge pages
and, freed and allocated again, no page faults at all."""
import os
import subprocess
import sys

import pytest

from reflex_jax import malloc_tuning as mt


# prints "start <pid>" once per (re)start, then the page faults of touching a 256 MiB malloc,
# and of touching it again after free + malloc (what XLA:CPU does with its buffers every step)
PROBE = """
import ctypes, os, resource, sys
print("start", os.getpid(), flush=True)
from reflex_jax.malloc_tuning import tune_malloc
tune_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
n = 256 << 20
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
p = libc.malloc(n)
ctypes.memset(p, 1, n)
first = faults() - before
libc.free(p)
before = faults()
ctypes.memset(libc.malloc(n), 1, n)
print("faults", first, faults() - before)
print("tunables", os.environ.get("GLIBC_TUNABLES", ""))
"""


def test_restart_env_decisions():
    new = mt.restart_env({"A": "1"}, (2, 36), "madvise")
    assert new["GLIBC_TUNABLES"] == ":".join(mt.TUNABLES) and new["A"] == "1"
    assert new[mt.RESTARTED] == "1"
    assert mt.restart_env({}, (2, 35), "always")["GLIBC_TUNABLES"] == ":".join(mt.TUNABLES)
    kept = mt.restart_env({"GLIBC_TUNABLES": "glibc.rtld.nns=8"}, (2, 36), "madvise")
    assert kept["GLIBC_TUNABLES"] == "glibc.rtld.nns=8:" + ":".join(mt.TUNABLES)
    # nothing to gain, or not ours to change: no restart
    assert mt.restart_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise") is None
    assert mt.restart_env({}, (2, 36), "never") is None
    assert mt.restart_env({}, (2, 36), None) is None
    assert mt.restart_env({}, (2, 34), "madvise") is None
    assert mt.restart_env({}, None, "madvise") is None
    assert mt.restart_env({mt.OPT_OUT: "0"}, (2, 36), "madvise") is None
    assert mt.restart_env({mt.RESTARTED: "1"}, (2, 36), "madvise") is None


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert mt.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert mt.thp_mode(str(f)) == "always"
    assert mt.thp_mode(str(tmp_path / "missing")) is None


def _probe(**env_over):
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", mt.OPT_OUT, mt.RESTARTED)}
    env.update(env_over)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split("\n")
    starts = [line.split()[1] for line in out if line.startswith("start")]
    faults = next(tuple(map(int, line.split()[1:])) for line in out if line.startswith("faults"))
    tunables = next(line[len("tunables "):] for line in out if line.startswith("tunables"))
    return starts, faults, tunables


def test_restart_gives_huge_pages_and_reuses_freed_memory():
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", mt.OPT_OUT)}
    if mt.restart_env(clean, mt.glibc_version(), mt.thp_mode()) is None:
        pytest.skip("no restart on this machine (glibc < 2.35 or transparent huge pages off)")
    starts, (first, again), tunables = _probe()
    assert len(starts) == 2 and starts[0] == starts[1]  # restarted once, same process
    assert tunables.endswith(":".join(mt.TUNABLES))
    off_starts, (off_first, off_again), off_tunables = _probe(**{mt.OPT_OUT: "0"})
    assert len(off_starts) == 1 and "glibc.malloc" not in off_tunables
    pages = (256 << 20) // 4096
    assert off_first >= 0.9 * pages and off_again >= 0.9 * pages  # glibc default: mmap, munmap
    assert first < off_first / 4, (first, off_first)  # huge pages: one fault per 2 MiB
    assert again < 0.01 * pages, (again, off_again)  # freed memory stayed in the heap
