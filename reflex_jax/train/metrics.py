"""The run's metrics log: metrics.jsonl, optional TensorBoard / W&B mirrors, the progress bar."""
from __future__ import annotations

import json
import os


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                desc="train", unit="step")


class MetricsLog:
    """metrics.jsonl (one JSON object per log line) plus optional TensorBoard / W&B mirrors.

    On resume, lines from steps after the restored step are dropped: they belong to the run that
    was interrupted, and the resumed run writes them again.
    """

    def __init__(self, path: str, start_step: int, enabled: bool, *, tensorboard=False, wandb=False,
                 config=None):
        self.enabled, self.path = enabled, path
        self.tb = self.wb = None
        if not enabled:
            return
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(keep)
        self.file = open(path, "a", encoding="utf-8")
        run_dir = os.path.dirname(path)
        if tensorboard:
            try:
                from flax.metrics import tensorboard as tb
                self.tb = tb.SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:
                print("tensorboard was asked for but is not installed (pip install tensorboard); "
                      "logging to metrics.jsonl only.")
        if wandb:
            try:
                import wandb as wb
                self.wb = wb.init(project="reflex_jax", dir=run_dir, config=config, resume="allow")
            except ImportError:
                print("wandb was asked for but is not installed (pip install wandb); "
                      "logging to metrics.jsonl only.")

    def write(self, row: dict):
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in row.items():
            if k != "step" and self.tb is not None:
                self.tb.scalar(k, v, row["step"])
        if self.wb is not None:
            self.wb.log(row, step=row["step"])

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.flush()
