"""One trainer per run directory: a lock file held by the live process.

`<run_dir>/train.lock` holds the owner's host and pid. A second trainer on the same directory
refuses in one sentence; a lock whose process is gone (same host, pid not running) is stale and
is taken over, saying so. A lock from another host cannot be checked from here: the sentence says
which host holds it and how to clear it if that run is dead.
"""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable

from ..errors import TrainingError

LOCK = "train.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user: alive
        return True
    return True


class RunLock:
    """The lock of `directory` (`lock_name` in it); its refusal names the directory as `what` and
    suggests `elsewhere` (compare.py locks its --out the same way)."""

    def __init__(self, directory: str, log: Callable[[str], None] = print, lock_name: str = LOCK,
                 what: str = "run_dir", elsewhere: str = "use another --config.run_dir"):
        self.path = os.path.join(directory, lock_name)
        self.log = log
        self.what, self.elsewhere = what, elsewhere
        self.held = False

    def _owner(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}  # being written right now, or damaged: treated as held by nobody known

    def acquire(self) -> "RunLock":
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        for _ in range(2):
            try:
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner.get("host") == me["host"] and owner.get("pid") == me["pid"]:
                    os.remove(self.path)  # this process's own lock (an earlier Trainer): re-take
                    continue
                if owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) \
                        and not _alive(owner["pid"]):
                    self.log(f"taking over the stale lock of process {owner['pid']} (no longer "
                             f"running) in {os.path.dirname(self.path)}")
                    os.remove(self.path)
                    continue
                who = (f"process {owner.get('pid')} on {owner.get('host')}" if owner
                       else "another process")
                raise TrainingError(
                    f"{self.what} {os.path.dirname(self.path)!r} is in use by {who} (lock "
                    f"{self.path}); wait for that run, {self.elsewhere}, or delete "
                    "the lock file if that run is no longer alive.") from None
            except OSError as e:  # a read-only disk or directory, no permission, a full disk
                raise TrainingError(
                    f"cannot write to {self.what} {os.path.dirname(self.path)!r} "
                    f"({e.strerror or e}); make it writable or {self.elsewhere} (sample.py reads "
                    "a run without writing to it).") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise TrainingError(f"could not take the lock {self.path}; another trainer is starting "
                            "on the same run_dir at this moment.")

    def release(self) -> None:
        if self.held:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            self.held = False

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
