"""Orbax checkpoints on a local disk or in a bucket (gs://...; orbax and tensorstore write there
directly, the JSON files go through reflex_jax.storage).

Two layouts, both loadable by `load_params(path) -> (ModelConfig, params)`:

* a **params directory** (what `convert_weights.py` writes): `model_config.json`, `meta.json`
  (free-form provenance, e.g. the tokenizer) and `params/` (an orbax StandardCheckpointer tree);
* a **run directory** (what `train.py` writes): `model_config.json`, `meta.json`, `config.json` and
  `checkpoints/<step>/` managed by orbax's CheckpointManager (see `RunCheckpoints`).
"""
from __future__ import annotations

import json
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from . import storage
from .errors import CheckpointError
from .model.config import ModelConfig

MODEL_CONFIG = "model_config.json"
META = "meta.json"
PARAMS = "params"
CHECKPOINTS = "checkpoints"


def write_json(path: str, obj: Any) -> None:
    """Local or remote; atomic: a reader never sees half a file."""
    storage.write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def read_model_config(directory: str) -> ModelConfig:
    path = storage.join(directory, MODEL_CONFIG)
    if not storage.exists(path):
        raise CheckpointError(f"{directory!r} has no {MODEL_CONFIG}; point at a directory written "
                              "by convert_weights.py or train.py.")
    return ModelConfig.from_dict(json.loads(storage.read_text(path)))


def read_meta(directory: str) -> dict:
    path = storage.join(directory, META)
    if not storage.exists(path):
        return {}
    return json.loads(storage.read_text(path))


def check_params_fit(cfg: ModelConfig, params, where: str) -> None:
    """Raise one sentence naming the first parameter whose presence or shape differs from `cfg`."""
    from .model import abstract_params
    want = {jax.tree_util.keystr(k): v.shape for k, v in
            jax.tree_util.tree_leaves_with_path(abstract_params(cfg))}
    have = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
            jax.tree_util.tree_leaves_with_path(params)}
    for name, shape in want.items():
        if name not in have:
            raise CheckpointError(f"checkpoint {where!r} lacks parameter {name} that the model "
                                  "config needs; it was written for a different architecture.")
        if tuple(have[name]) != tuple(shape):
            raise CheckpointError(f"checkpoint {where!r}: parameter {name} has shape {have[name]} "
                                  f"but the model config needs {tuple(shape)}; use the model config "
                                  "saved with the checkpoint or convert the weights again.")
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointError(f"checkpoint {where!r} has parameter {extra[0]} that the model config "
                              "does not use; it was written for a different architecture.")


def save_params(directory: str, cfg: ModelConfig, params, meta: Optional[dict] = None) -> str:
    """Write a params directory (orbax tree + model config + meta). Returns the directory."""
    directory = storage.resolve(directory)
    storage.makedirs(directory)
    target = storage.join(directory, PARAMS)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(target, params, force=True)
    ckptr.wait_until_finished()
    write_json(storage.join(directory, MODEL_CONFIG), cfg.to_dict())
    write_json(storage.join(directory, META), meta or {})
    return directory


def restore_tree(path: str, abstract_tree=None):
    """Restore an orbax StandardCheckpointer tree (onto `abstract_tree`'s shardings if given)."""
    ckptr = ocp.StandardCheckpointer()
    if abstract_tree is None:
        return ckptr.restore(path)
    return ckptr.restore(path, abstract_tree)


def load_params(path: str, step: Optional[int] = None, which: str = "best"):
    """(ModelConfig, params) from a params directory or a run directory.

    For a run directory: `step` picks a specific saved step; otherwise `which` is `best` (lowest
    validation loss, falling back to latest when no eval ran) or `latest`.
    """
    path = storage.resolve(path)
    if not storage.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist; pass a directory "
                              "written by convert_weights.py or train.py.")
    cfg = read_model_config(path)
    if storage.isdir(storage.join(path, PARAMS)):
        params = restore_tree(storage.join(path, PARAMS))
        check_params_fit(cfg, params, path)
        return cfg, params
    if storage.isdir(storage.join(path, CHECKPOINTS)):
        ckpts = RunCheckpoints(path, create=False)
        try:
            chosen = ckpts.pick_step(step, which)
            params = ckpts.restore_params(chosen)
        finally:
            ckpts.close()
        check_params_fit(cfg, params, f"{path} step {chosen}")
        return cfg, params
    raise CheckpointError(f"{path!r} holds neither params/ nor checkpoints/; it is not a "
                          "converted-weights or run directory.")


class RunCheckpoints:
    """`<run_dir>/checkpoints/<step>/{params,opt}`: orbax CheckpointManager with keep-last-N plus
    the best step by validation loss.

    Params and optimizer state are separate items, so sampling restores params alone. Orbax writes
    each step into a temporary directory and renames it only once complete (in a bucket, where a
    rename is a copy: writes in place and adds commit_success.txt last), so a process killed
    mid-save leaves no step that `latest_step` would return.
    """

    def __init__(self, run_dir: str, keep: int = 3, async_save: bool = True, create: bool = True):
        from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN
        self.directory = storage.join(storage.resolve(run_dir), CHECKPOINTS)
        if not create and not storage.isdir(self.directory):
            raise CheckpointError(f"{run_dir!r} has no {CHECKPOINTS}/ directory; train first or "
                                  "point at a run directory that has checkpoints.")
        metric = lambda m: m["val_loss"]  # noqa: E731
        options = ocp.CheckpointManagerOptions(
            preservation_policy=AnyPreservationPolicy([
                LatestN(max(1, keep)),
                BestN(get_metric_fn=metric, reverse=True, n=1, keep_checkpoints_without_metrics=False),
            ]),
            best_fn=metric, best_mode="min", enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, params, opt_state, val_loss: Optional[float] = None) -> None:
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                        opt=ocp.args.StandardSave(opt_state)),
                          metrics=metrics, force=True)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        return self.manager.best_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def pick_step(self, step: Optional[int] = None, which: str = "best") -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"{self.directory!r} holds no finished checkpoint; train longer "
                                  "(config.checkpoint_interval) or pick another run directory.")
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"step {step} is not saved in {self.directory!r}; saved steps: "
                                      f"{', '.join(map(str, steps))}.")
            return step
        if which not in ("best", "latest"):
            raise CheckpointError(f"which={which!r} must be 'best' or 'latest'.")
        best = self.best_step() if which == "best" else None
        return best if best is not None else steps[-1]

    def restore(self, step: int, abstract_params, abstract_opt_state):
        """(params, opt_state) at `step`, placed like the abstract trees' shardings."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt=ocp.args.StandardRestore(abstract_opt_state)))
        return out["params"], out["opt"]

    def restore_params(self, step: int, abstract_params=None):
        restore = ocp.args.StandardRestore(abstract_params)
        return self.manager.restore(step, args=ocp.args.Composite(params=restore))["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
