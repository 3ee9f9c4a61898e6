"""Orbax checkpoints on disk.

Two layouts, both loadable by `load_params(path) -> (ModelConfig, params)`:

* a **params directory** (what `convert_weights.py` writes): `model_config.json`, `meta.json`
  (free-form provenance, e.g. the tokenizer) and `params/` (an orbax StandardCheckpointer tree);
* a **run directory** (what `train.py` writes): `model_config.json`, `config.json` and
  `checkpoints/<step>/` managed by orbax's CheckpointManager (see `RunCheckpoints`).
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from .config import ModelConfig

MODEL_CONFIG = "model_config.json"
META = "meta.json"
PARAMS = "params"
CHECKPOINTS = "checkpoints"


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not fit; the message names the path and the fix."""


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, default=str)
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def read_model_config(directory: str) -> ModelConfig:
    path = os.path.join(directory, MODEL_CONFIG)
    if not os.path.exists(path):
        raise CheckpointError(f"{directory!r} has no {MODEL_CONFIG}; point at a directory written "
                              "by convert_weights.py or train.py.")
    with open(path, encoding="utf-8") as f:
        return ModelConfig.from_dict(json.load(f))


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, META)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def abstract_params(cfg: ModelConfig):
    """ShapeDtypeStructs of `cfg`'s params (no allocation)."""
    from .model import init_params
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def check_params_fit(cfg: ModelConfig, params, where: str) -> None:
    """Raise one sentence naming the first parameter whose presence or shape differs from `cfg`."""
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
    directory = os.path.abspath(directory)
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, PARAMS)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(target, params, force=True)
    ckptr.wait_until_finished()
    write_json(os.path.join(directory, MODEL_CONFIG), cfg.to_dict())
    write_json(os.path.join(directory, META), meta or {})
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
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist; pass a directory "
                              "written by convert_weights.py or train.py.")
    cfg = read_model_config(path)
    if os.path.isdir(os.path.join(path, PARAMS)):
        params = restore_tree(os.path.join(path, PARAMS))
        check_params_fit(cfg, params, path)
        return cfg, params
    raise CheckpointError(f"{path!r} holds neither params/ nor checkpoints/; it is not a "
                          "converted-weights or run directory.")
