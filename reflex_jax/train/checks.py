"""Checks that run before anything compiles: each turns a run that would fail later (or train on
nothing) into one sentence naming the config field to change."""
from __future__ import annotations

import math
import os
import sys
from typing import Optional

from ..errors import TrainingError

_WARNED: set = set()  # the Trainer and the TrainProgram both check a config: warn once


def check_run_config(c) -> None:
    """The run-level fields of an ml_collections config."""
    if c.batch_size < 1 or c.grad_accum < 1 or c.batch_size % c.grad_accum:
        raise TrainingError(f"batch_size={c.batch_size} must be a positive multiple of "
                            f"grad_accum={c.grad_accum}; each micro-batch has batch_size/grad_accum rows.")
    if c.max_steps < 1:
        raise TrainingError(f"max_steps={c.max_steps} must be >= 1.")
    if c.data.loss_on not in ("all", "answer"):
        raise TrainingError(f"data.loss_on={c.data.loss_on!r} must be 'all' or 'answer'.")
    for name in ("eval_interval", "checkpoint_interval", "log_interval"):
        if getattr(c, name) < 0:
            raise TrainingError(f"{name}={getattr(c, name)} must be >= 0 (0 turns it off).")
    minutes = c.get("checkpoint_minutes", 0)
    if not isinstance(minutes, (int, float)) or not math.isfinite(minutes) or minutes < 0:
        raise TrainingError(f"checkpoint_minutes={minutes} must be a number >= 0 (0 turns time-based "
                            "saves off).")
    from .step import RNG_IMPLS
    rng_impl = c.get("rng_impl", RNG_IMPLS[0])
    if rng_impl not in RNG_IMPLS:
        raise TrainingError(f"rng_impl={rng_impl!r} is not a key implementation; set "
                            f"--config.rng_impl to one of {', '.join(RNG_IMPLS)}.")
    profile_window(c.get("profile_steps", ""))
    from ..model.remat import remat_policy
    remat_policy(c.get("remat", False))
    prefetch = c.data.get("prefetch", 0)
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise TrainingError(f"data.prefetch={prefetch!r} must be an integer >= 0 (batches read "
                            "ahead of the step; 0 reads each in the step's path).")
    if c.keep_checkpoints < 1:  # the checkpoint manager kept 1 for any smaller value, silently
        raise TrainingError(f"keep_checkpoints={c.keep_checkpoints} must be >= 1 (the newest "
                            "checkpoints kept besides the best); set --config.keep_checkpoints=1 "
                            "or more.")
    _check_data_task(c)
    if c.optim.warmup_steps >= c.max_steps:
        _warn_once(f"optim.warmup_steps={c.optim.warmup_steps} >= max_steps={c.max_steps}: the "
                   f"learning rate rises for the whole run and never decays to min_lr; set "
                   f"--config.optim.warmup_steps below {c.max_steps} for a decay.")


def _warn_once(text: str) -> None:
    if text not in _WARNED:
        _WARNED.add(text)
        print(f"warning: {text}", file=sys.stderr, flush=True)


def _check_data_task(c) -> None:
    """data.dir wins over data.task, but a data.task left from the config file (configs/tiny.py
    sets one) still asks for the task's exact-match evaluation, which a prepare()d directory
    cannot give: name the override that drops it."""
    if not (c.data.dir and c.data.task) or not os.path.isdir(c.data.dir):
        return
    from ..data.store import read_data_meta
    meta = read_data_meta(c.data.dir)
    if meta is not None and not meta.get("task"):
        raise TrainingError(f"data.dir={c.data.dir!r} was prepared from files, but data.task="
                            f"{c.data.task!r} is set too (the config file sets it); add "
                            "--config.data.task= (empty) to train on that directory, or drop "
                            "data.dir to train on the task.")


def check_fits_data(meta: dict, cfg, data_dir: str) -> None:
    """The prepared data's vocabulary fits the model and its train split holds a window."""
    if meta["vocab_size"] > cfg.vocab_size:
        raise TrainingError(
            f"the data in {data_dir!r} uses a {meta['vocab_size']}-token vocabulary but "
            f"model.vocab_size={cfg.vocab_size}; set --config.model.vocab_size={meta['vocab_size']} "
            "(or larger).")
    tokens = meta["splits"].get("train", {}).get("tokens", 0)
    if tokens < cfg.block_size + 1:
        raise TrainingError(
            f"the train split of {data_dir!r} has {tokens} tokens, fewer than one "
            f"window of block_size+1={cfg.block_size + 1}; lower --config.model.block_size "
            "or prepare more data.")


def check_fits_mesh(c, batch_shards: int) -> None:
    """Every micro-batch splits evenly over the mesh's batch axes."""
    micro = c.batch_size // c.grad_accum
    if micro % batch_shards:
        raise TrainingError(
            f"batch_size/grad_accum = {micro} rows per micro-batch must be divisible by "
            f"config.mesh data*fsdp = {batch_shards} (every batch shard takes an equal slice); change "
            "--config.batch_size or the mesh.")


def profile_window(text: str) -> Optional[tuple[int, int]]:
    """(START, END) of `profile_steps` "START:END" (steps START+1..END are traced), or None."""
    if not text:
        return None
    start, sep, end = str(text).partition(":")
    if not (sep and start.strip().isdigit() and end.strip().isdigit()) or int(end) <= int(start):
        raise TrainingError(f"profile_steps={text!r} must be START:END with 0 <= START < END "
                            "(steps START+1..END are traced), e.g. --config.profile_steps=10:15.")
    return int(start), int(end)
