"""The command-line programs. Each is a `main(argv)` here; the scripts at the top of the repository
(`train.py`, `sample.py`, ...) and the console scripts of pyproject.toml only call it.

A `ReflexError` (a user's mistake) ends every CLI the same way, in `exit_on_user_error`: one line
`<prog>: error: <sentence>` on stderr and exit status 2. Set REFLEX_TRACEBACK=1 (or train.py's
--traceback) to see the traceback instead. JAX failing to start a platform that JAX_PLATFORMS
names is such a mistake too (hardware.platform_error).

Every console entry calls `quiet_start()` before JAX starts: on a machine without accelerators
JAX then starts on the CPU without the plugins' start-up noise (hardware.quiet_cpu_only).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Optional

from ..errors import ReflexError

TRACEBACK_ENV = "REFLEX_TRACEBACK"


def print_user_error(prog: str, error: BaseException) -> None:
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)


def quiet_start() -> None:
    """Call first in a console entry, before JAX starts (see the module docstring)."""
    from ..hardware import quiet_cpu_only
    quiet_cpu_only()


def user_error(error: BaseException) -> Optional[ReflexError]:
    """`error` as a user's mistake, or None when it is a bug (which keeps its traceback)."""
    if isinstance(error, ReflexError):
        return error
    if isinstance(error, (RuntimeError, AssertionError)):  # JAX could not start a platform
        from ..hardware import platform_error
        return platform_error(error)
    return None


def _show_traceback(traceback: bool = False) -> bool:
    return traceback or os.environ.get(TRACEBACK_ENV) == "1"


@contextlib.contextmanager
def exit_on_user_error(prog: str, *, traceback: bool = False,
                       exit: Optional[Callable[[int], None]] = None):
    """Run the body; a ReflexError is printed as one line and the process exits with status 2
    (through `exit`, default sys.exit)."""
    try:
        yield
    except (ReflexError, RuntimeError, AssertionError) as e:
        mistake = user_error(e)
        if mistake is None or _show_traceback(traceback):
            raise
        print_user_error(prog, mistake)
        (exit or sys.exit)(2)


def user_errors_as_status(prog: str, main: Callable[[], Optional[int]]) -> int:
    """`main()`'s status, or 2 after printing a ReflexError as one line (for in-process callers
    such as tests, which want the status rather than SystemExit)."""
    try:
        return main() or 0
    except (ReflexError, RuntimeError, AssertionError) as e:
        mistake = user_error(e)
        if mistake is None or _show_traceback():
            raise
        print_user_error(prog, mistake)
        return 2
