"""Rematerialisation policies: which activations of a block the backward pass keeps and which it
recomputes (the run's `remat` switch; the trade between memory and time).

    none              keep everything (no recompute)
    block             recompute each whole block from its input (what `remat=True` always meant)
    nothing_saveable  the same program as `block`: nothing inside a block is kept
    dots_saveable     keep the matmul outputs, recompute the elementwise work between them
    offload           keep the matmul outputs in host memory, not on the chip (TPU, GPU)
"""
from __future__ import annotations

from typing import Optional, Union

import jax

from ..errors import ConfigError

REMAT_POLICIES = ("none", "block", "nothing_saveable", "dots_saveable", "offload")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no", "")


def remat_policy(value: Union[bool, str, None]) -> str:
    """The policy name of a `remat` setting: True/False (and their command-line spellings) are
    'block' / 'none'; anything else must be a name of REMAT_POLICIES."""
    if value is None or isinstance(value, bool):
        return "block" if value else "none"
    text = str(value).strip().lower()
    if text in _TRUE:
        return "block"
    if text in _FALSE:
        return "none"
    if text not in REMAT_POLICIES:
        raise ConfigError(f"remat={value!r} is unknown; use one of {' | '.join(REMAT_POLICIES)} "
                          "(True/False mean block/none).")
    return text


def checkpoint_policy(name: str, platform: Optional[str] = None):
    """The jax.checkpoint policy of a policy name (None: recompute everything but the inputs)."""
    if name == "dots_saveable":
        return jax.checkpoint_policies.dots_saveable
    if name == "offload":
        if (platform or jax.default_backend()) == "cpu":
            raise ConfigError("remat='offload' moves kept activations from an accelerator's memory "
                              "to the host's, and this step is compiled for a CPU; use "
                              "dots_saveable or block here.")
        return jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host")
    return None  # block, nothing_saveable
