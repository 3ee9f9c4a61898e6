"""Checksums of saved checkpoint steps: every file of a step, its size and SHA-256.

Orbax's own files carry no checksum that a restore verifies (a truncated chunk fails deep inside
tensorstore; overwritten bytes restore silently), so after a step is fully written its files are
hashed into `<run_dir>/checkpoint_checksums/<step>.json`, and a restore first compares them. A
step is **verified** when its files match their checksums, **damaged** when one differs or is
missing, and **unverified** when it has no readable checksum file (saved by an older version, or
the run stopped, or the disk filled, between its commit and its hashing): restores prefer verified
steps and say when they use an unverified one. Local directories only: in a bucket, the storage
service checks every object's CRC32C itself.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Optional

SUMS = "checkpoint_checksums"
_CHUNK = 1 << 22


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def step_files(step_dir: str) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under `step_dir`."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, step_dir)] = [os.path.getsize(path), _digest(path)]
    return dict(sorted(out.items()))


class StepChecksums:
    """The checksum files of one run's checkpoint directory (`<run_dir>/checkpoints`)."""

    def __init__(self, checkpoints_dir: str):
        self.checkpoints_dir = checkpoints_dir
        self.directory = os.path.join(os.path.dirname(checkpoints_dir), SUMS)

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, f"{step}.json")

    def write(self, step: int) -> None:
        """Hash `step`'s files into its checksum file (atomically: a failed write, e.g. a full
        disk, leaves no checksum file and no temp file, so the step stays unverified)."""
        files = step_files(os.path.join(self.checkpoints_dir, str(step)))
        os.makedirs(self.directory, exist_ok=True)
        tmp = f"{self._path(step)}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"step": step, "files": files}, f)
            os.replace(tmp, self._path(step))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def has(self, step: int) -> bool:
        return os.path.exists(self._path(step))

    def _wanted(self, step: int) -> Optional[dict]:
        try:
            with open(self._path(step), encoding="utf-8") as f:
                files = json.load(f)["files"]
            return files if isinstance(files, dict) and files else None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def unverified_reason(self, step: int) -> Optional[str]:
        """Why `step` cannot be verified (no checksum file, or an unreadable one), else None."""
        if not self.has(step):
            return "it has no checksum file"
        if self._wanted(step) is None:
            return f"its checksum file {self._path(step)} is unreadable"
        return None

    def problem(self, step: int) -> Optional[str]:
        """What differs from `step`'s checksums (its damage), or None: its files match them, or
        it cannot be verified (see `unverified_reason`)."""
        want = self._wanted(step)
        if want is None:
            return None
        step_dir = os.path.join(self.checkpoints_dir, str(step))
        for rel, (size, digest) in want.items():
            path = os.path.join(step_dir, rel)
            if not os.path.exists(path):
                return f"{rel} is missing"
            if os.path.getsize(path) != size:
                return f"{rel} has {os.path.getsize(path):,} bytes instead of {size:,}"
            if _digest(path) != digest:
                return f"{rel} differs from its checksum"
        return None

    def keep_only(self, steps) -> None:
        """Drop the checksum files of steps that no longer exist."""
        if not os.path.isdir(self.directory):
            return
        keep = {f"{s}.json" for s in steps}
        for name in os.listdir(self.directory):
            if name.endswith(".json") and name not in keep:
                os.remove(os.path.join(self.directory, name))
