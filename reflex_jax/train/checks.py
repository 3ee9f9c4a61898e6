"""Checks that run before anything compiles: each turns a run that would fail later (or train on
nothing) into one sentence naming the config field to change."""
from __future__ import annotations

from ..errors import TrainingError


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
