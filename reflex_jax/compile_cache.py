"""JAX's persistent compilation cache for a run (`train.py --compile_cache DIR`): every program that
took at least a second to compile is written to DIR, and a later run of the same program (same
model, shapes, mesh, JAX and device kind) reads it back instead of compiling, which is what a pod
restarted after preemption spends its first minutes on. A cache written by a `--compile_for` dry
run is of no use (its executables load only on the hardware it targets), so dry runs leave the
cache alone. DIR may be a bucket path JAX can write (gs://...)."""
from __future__ import annotations

import os
from typing import Optional

_state = {"dir": None, "requests": 0, "hits": 0, "saved_s": 0.0}

_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
_HIT = "/jax/compilation_cache/cache_hits"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"


def enable(path: str) -> None:
    """Use `path` as JAX's persistent compilation cache and count what it saves; before the first
    compile of the process."""
    import jax
    from jax import monitoring

    from .errors import UsageError
    if "://" not in path:
        try:
            os.makedirs(path, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise PermissionError("not writable")
        except OSError as e:
            raise UsageError(f"--compile_cache {path!r} cannot be written ({e}); pass a directory "
                             "this process can create and write.") from None
    jax.config.update("jax_compilation_cache_dir", path)
    if _state["dir"] is None:
        monitoring.register_event_listener(_on_event)
        monitoring.register_event_duration_secs_listener(_on_duration)
    _state["dir"] = path


def _on_event(event: str, **_) -> None:
    if event == _REQUEST:
        _state["requests"] += 1
    elif event == _HIT:
        _state["hits"] += 1


def _on_duration(event: str, duration: float, **_) -> None:
    if event == _SAVED:
        _state["saved_s"] += duration


def summary() -> Optional[str]:
    """'compile cache DIR: 3 of 5 programs read back (41 s of compiling saved)', or None when
    no cache is on or nothing was looked up in it."""
    if _state["dir"] is None or not _state["requests"]:
        return None
    return (f"compile cache {_state['dir']}: {_state['hits']} of {_state['requests']} programs read "
            f"back ({_state['saved_s']:.0f} s of compiling saved)")
