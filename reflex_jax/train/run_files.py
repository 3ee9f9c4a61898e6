"""A run directory's own files, besides its checkpoints and metrics: `model_config.json`,
`config.json`, `meta.json` (tokenizer, data directory and fingerprint, template, task) and
`config_history.json` (every config the run started with), and the checks a resume makes against
them: the same model, the same data (unless asked otherwise)."""
from __future__ import annotations

import json
import os
import time
from typing import Callable

from .. import checkpoint as ckpt
from .. import data as data_lib
from .. import sharding, storage
from ..errors import TrainingError
from ..run_config import flatten_config, model_fields


class RunFiles:
    """The files of `config.run_dir` for a run of `model_config`; process 0 writes them."""

    def __init__(self, config, model_config, is_main: bool, log: Callable[[str], None]):
        self.config, self.model_config = config, model_config
        self.run_dir, self.is_main, self.log = config.run_dir, is_main, log
        self._previous_config = None

    def resuming(self) -> bool:
        return storage.isdir(storage.join(self.run_dir, ckpt.CHECKPOINTS))

    def write(self, data, data_dir: str) -> None:
        """Check a resumed run's model and data against what it was trained on, then (process 0)
        write the run's files."""
        storage.makedirs(self.run_dir)
        model_path = storage.join(self.run_dir, ckpt.MODEL_CONFIG)
        resuming = self.resuming()
        if storage.exists(model_path):
            diff = self.model_config.model_differences(ckpt.read_model_config(self.run_dir))
            if diff and resuming:
                raise TrainingError(
                    f"run_dir {self.run_dir!r} holds checkpoints of a different model (model."
                    f"{diff[0]} differs); use a new --config.run_dir or the same model config to "
                    "resume.")
        fingerprint = data_lib.data_fingerprint(data)
        if resuming:
            self._check_same_data(fingerprint, data_dir)
        self._previous_config = _read_json_or_none(storage.join(self.run_dir, "config.json"))
        # every process checks (same files, same verdict); only process 0 writes, since two
        # writers racing on the same temp file would break the atomic replace
        if self.is_main:
            c = self.config
            ckpt.write_json(model_path, self.model_config.to_dict())
            ckpt.write_json(storage.join(self.run_dir, "config.json"), c.to_dict())
            ckpt.write_json(storage.join(self.run_dir, ckpt.META),
                            {"tokenizer": data.meta["tokenizer"],
                             "data_dir": storage.resolve(data_dir) if storage.is_remote(data_dir)
                             else os.path.abspath(data_dir),
                             "data_fingerprint": fingerprint,
                             "template": data.meta.get("template"), "task": c.data.task or None})
        sharding.sync_processes("run files written")

    def _check_same_data(self, fingerprint: str, data_dir: str) -> None:
        """Resuming on other data than the run was trained on refuses, unless asked."""
        before = ckpt.read_checkpoint_meta(self.run_dir).get("data_fingerprint")
        if before is None or before == fingerprint:
            return
        if not self.config.data.get("resume_on_changed_data", False):
            raise TrainingError(
                f"run_dir {self.run_dir!r} was trained on data with fingerprint {before} but "
                f"{data_dir!r} now holds data with fingerprint {fingerprint}; resume on the "
                "data it was trained on, use a new --config.run_dir, or pass "
                "--config.data.resume_on_changed_data=True.")
        self.log(f"resuming on changed data (fingerprint {before} -> {fingerprint}), as asked")

    def record_config(self, start_step: int) -> None:
        """Log what a resumed run changed, and keep every config the run ran with
        (config_history.json: one entry per start). Call after `write`."""
        c, before = self.config, self._previous_config
        changed = {}
        if before is not None and start_step > 0:
            old = flatten_config(_with_model_fields(before))
            new = flatten_config(_with_model_fields(json.loads(json.dumps(c.to_dict(),
                                                                          default=str))))
            changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
                       if old.get(k) != new.get(k)}
            if changed:
                self.log("resuming with changed settings: " + "; ".join(
                    f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        if not self.is_main:
            return
        path = storage.join(self.run_dir, "config_history.json")
        history = _read_json_or_none(path) or []
        history.append({"start_step": start_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "changed": changed, "config": c.to_dict()})
        ckpt.write_json(path, history)


def _read_json_or_none(path: str):
    try:
        return json.loads(storage.read_text(path)) if storage.exists(path) else None
    except ValueError:  # a damaged file from an earlier start: history starts afresh
        return None


def _with_model_fields(config: dict) -> dict:
    """A stored config with its model section's old names folded in (model.reflex is an older
    run's model.head_plan), so that a resume does not report a renamed field as a change."""
    if isinstance(config.get("model"), dict):
        return {**config, "model": model_fields(config["model"])}
    return config
