"""The command-line programs. Each is a `main(argv)` here; the scripts at the top of the repository
(`train.py`, `sample.py`, ...) and the console scripts of pyproject.toml only call it.

A `ReflexError` (a user's mistake) ends every CLI the same way, in `exit_on_user_error`: one line
`<prog>: error: <sentence>` on stderr and exit status 2. Set REFLEX_TRACEBACK=1 (or train.py's
--traceback) to see the traceback instead.
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


@contextlib.contextmanager
def exit_on_user_error(prog: str, *, traceback: bool = False,
                       exit: Optional[Callable[[int], None]] = None):
    """Run the body; a ReflexError is printed as one line and the process exits with status 2
    (through `exit`, default sys.exit)."""
    try:
        yield
    except ReflexError as e:
        if traceback or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print_user_error(prog, e)
        (exit or sys.exit)(2)


def user_errors_as_status(prog: str, main: Callable[[], Optional[int]]) -> int:
    """`main()`'s status, or 2 after printing a ReflexError as one line (for in-process callers
    such as tests, which want the status rather than SystemExit)."""
    try:
        return main() or 0
    except ReflexError as e:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print_user_error(prog, e)
        return 2
