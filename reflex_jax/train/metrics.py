"""The run's metrics log: metrics.jsonl, optional TensorBoard / W&B mirrors, the progress bar."""
from __future__ import annotations

import contextlib
import json
import os

from .. import storage
from ..errors import TrainingError


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                desc="train", unit="step")


def _rows_up_to(text: str, start_step: int) -> list[str]:
    """The lines of `text` for steps <= start_step; a torn last line (a kill mid-write) is dropped."""
    keep = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step", 0) <= start_step:
            keep.append(line + "\n")
    return keep


class _LocalLines:
    """Appends to a local file, one unbuffered write per line. A write that fails (a full disk)
    is cut back to the last whole line and stops the run in one sentence: no torn line."""

    def __init__(self, path: str, keep: list[str]):
        self.path = path
        try:
            if keep is not None:
                storage.write_text_atomic(path, "".join(keep))
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise self._failed(e) from None

    def _failed(self, e: OSError) -> TrainingError:
        return TrainingError(f"writing {self.path} failed ({e.strerror or e}); free space or fix "
                             "the storage, then run again: the run resumes from its last "
                             "checkpoint.")

    def append(self, line: str):
        data, size = line.encode("utf-8"), os.fstat(self.fd).st_size
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as e:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, size)
            raise self._failed(e) from None

    def close(self):
        os.close(self.fd)


class _RemoteLines:
    """A bucket object cannot be appended to: every line uploads the whole log again, so a row is
    stored before the checkpoint that follows it (one small upload per log line)."""

    def __init__(self, path: str, keep: list[str]):
        self.path, self.lines = path, list(keep or [])
        if keep is not None:
            storage.write_text_atomic(path, "".join(self.lines))

    def append(self, line: str):
        self.lines.append(line)
        storage.write_text_atomic(self.path, "".join(self.lines))

    def close(self):
        pass


class MetricsLog:
    """metrics.jsonl (one JSON object per log line) plus optional TensorBoard / W&B mirrors; the
    run directory may be local or in a bucket (gs://...).

    On resume, lines from steps after the restored step are dropped: they belong to the run that
    was interrupted, and the resumed run writes them again.
    """

    def __init__(self, path: str, start_step: int, enabled: bool, *, tensorboard=False, wandb=False,
                 config=None):
        self.enabled, self.path = enabled, path
        self.tb = self.wb = None
        if not enabled:
            return
        keep = _rows_up_to(storage.read_text(path), start_step) if storage.exists(path) else None
        lines = _RemoteLines if storage.is_remote(path) else _LocalLines
        self.lines = lines(path, keep)
        run_dir = os.path.dirname(path)
        if tensorboard:
            try:
                from flax.metrics import tensorboard as tb
                self.tb = tb.SummaryWriter(storage.join(run_dir, "tb"))
            except ImportError:
                print("tensorboard was asked for but is not installed (pip install tensorboard); "
                      "logging to metrics.jsonl only.")
        if wandb:
            try:
                import wandb as wb
                # W&B keeps its files on a local disk
                local = storage.local_cache_dir(run_dir) if storage.is_remote(run_dir) else run_dir
                storage.makedirs(local)
                self.wb = wb.init(project="reflex_jax", dir=local, config=config, resume="allow")
            except ImportError:
                print("wandb was asked for but is not installed (pip install wandb); "
                      "logging to metrics.jsonl only.")

    def write(self, row: dict):
        if not self.enabled:
            return
        self.lines.append(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and self.tb is not None:
                self.tb.scalar(k, v, row["step"])
        if self.wb is not None:
            self.wb.log(row, step=row["step"])

    def close(self):
        if self.enabled:
            self.lines.close()
            if self.tb is not None:
                self.tb.flush()
