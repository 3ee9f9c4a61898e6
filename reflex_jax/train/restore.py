"""`init_from`: a run's starting params from a params directory or another run's best step,
checked against the model before any weight is read where possible."""
from __future__ import annotations

import jax

from .. import checkpoint as ckpt
from .. import storage


def load_init_params(path: str, cfg, abstract_params, step=None):
    """Params for `cfg` from `path` (a run's best step, or `step`); `abstract_params` carry the
    shardings to restore onto."""
    if jax.process_count() == 1:
        _, params = ckpt.load_params(path, step=step)
        ckpt.check_params_fit(cfg, params, path)
        return params
    # multi-host: orbax cannot restore a tree saved on another topology without a target, and
    # no host needs the whole model: every process restores only its shards of this mesh
    import orbax.checkpoint as ocp
    path = storage.resolve(path)
    ckpt.read_model_config(path)  # one sentence if this is not a params or run directory

    def check(item: str, where: str):  # shapes from the metadata, before reading any weights
        meta = ocp.StandardCheckpointer().metadata(item).item_metadata
        ckpt.check_params_fit(cfg, getattr(meta, "tree", meta), where)

    if storage.isdir(storage.join(path, ckpt.PARAMS)):
        check(storage.join(path, ckpt.PARAMS), path)
        return ckpt.restore_tree(storage.join(path, ckpt.PARAMS), abstract_params)
    run = ckpt.RunCheckpoints(path, read_only=True)
    try:
        step = run.pick_step(step)
        check(storage.join(run.directory, str(step), "params"), f"{path} step {step}")
        return run.restore_params_intact(step, abstract_params=abstract_params)[1]
    finally:
        run.close()
