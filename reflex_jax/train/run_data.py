"""The run's token data: a prepared directory (`data.dir`), or a built-in task (`data.task`)
generated into the run directory on first use."""
from __future__ import annotations

import os

from .. import data as data_lib
from .. import sharding, storage
from ..errors import TrainingError


def open_data(config, is_main: bool):
    """(TokenData, its local directory) of the run `config`."""
    c = config
    if c.data.dir:
        if storage.is_remote(c.data.dir):  # read by range, cached on this host (data/ranged.py)
            return data_lib.TokenData.open(c.data.dir), c.data.dir
        if not os.path.isdir(c.data.dir):
            raise TrainingError(
                f"data directory {c.data.dir!r} does not exist; prepare it with "
                f"`python -m reflex_jax.data prepare --out {c.data.dir} ...` or set --config.data.dir.")
        return data_lib.TokenData.open(c.data.dir), c.data.dir
    if c.data.task:
        # token data is memory-mapped, so a run in a bucket keeps its task data on each host's
        # disk, where every process generates it (deterministic in the seed)
        remote = storage.is_remote(c.run_dir)
        root = storage.local_cache_dir(c.run_dir) if remote else c.run_dir
        out = os.path.join(root, "data")
        if is_main or remote:
            data_lib.prepare_task(c.data.task, out, tokenizer=c.data.tokenizer,
                                  n_train=c.data.task_rows, n_val=c.data.task_val_rows,
                                  seed=c.seed, verbose=is_main, **task_options(c.data))
        sharding.sync_processes("prepared task data")
        return data_lib.TokenData.open(out), out
    raise TrainingError("no training data: set --config.data.dir to a prepared directory or "
                        "--config.data.task to a built-in task.")


def task_options(data_config) -> dict:
    """The config's task options that the chosen task has (the config lists every task's options)."""
    known = data_lib.get_task(data_config.task).defaults
    return {k: v for k, v in dict(data_config.task_options).items() if k in known}
