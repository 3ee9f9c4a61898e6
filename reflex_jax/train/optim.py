"""The optax chain: global-norm clipping, AdamW with warmup + cosine decay to a floor.

Weight decay touches matrices only: not norms, not biases, and not the token/position embeddings
unless `decay_embeddings` is set (the tied embedding doubles as the output head, and decaying it
mostly shrinks rare tokens).
"""
from __future__ import annotations

import jax
import optax

from ..errors import ConfigError

EMBEDDINGS = ("wte", "wpe")


def lr_schedule(lr: float, min_lr: float, warmup_steps: int, total_steps: int):
    """Linear warmup from 0 to `lr`, then cosine to `min_lr` at `total_steps`, then flat."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    decay_steps = max(1, total_steps - warmup_steps)
    cosine = optax.cosine_decay_schedule(lr, decay_steps, alpha=min_lr / lr if lr else 0.0)
    if warmup_steps == 0:
        return cosine
    warmup = optax.linear_schedule(0.0, lr, warmup_steps)
    return optax.join_schedules([warmup, cosine], [warmup_steps])


def decay_mask(params, decay_embeddings: bool = False):
    """True for leaves that get weight decay: weight matrices, embeddings only if asked.

    Decided by name, not rank: attention biases are [heads, head_dim] but are still biases.
    """
    def keep(path, leaf):
        top, last = getattr(path[0], "key", None), getattr(path[-1], "key", None)
        if top in EMBEDDINGS:
            return decay_embeddings
        # route logits are 2-D but mixing weights: decay would pull every route to uniform
        return last not in ("bias", "scale", "route_logits", "value_mix") and leaf.ndim >= 2
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim_cfg, total_steps: int):
    """(optax transformation, lr schedule) from the `config.optim` section."""
    o = optim_cfg
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"optim.lr={o.lr} and optim.min_lr={o.min_lr} must satisfy "
                          "0 <= min_lr <= lr and lr > 0.")
    schedule = lr_schedule(o.lr, o.min_lr, o.warmup_steps, total_steps)
    parts = []
    if o.clip and o.clip > 0:
        parts.append(optax.clip_by_global_norm(o.clip))
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             mask=lambda p: decay_mask(p, o.decay_embeddings)))
    return optax.chain(*parts), schedule
