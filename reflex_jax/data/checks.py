"""Checks of the options that prepare() and the loaders take."""
from __future__ import annotations

import numpy as np

from ..errors import ConfigError

LONG_ROWS = ("keep", "split", "drop")


def check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{name}={value!r} must be an integer >= {low}.")


def check_prepare_options(val_fraction, seed, long_rows, max_tokens, batch_rows) -> None:
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction={val_fraction!r} must be in [0, 1), e.g. 0.005.")
    check_int("seed", seed, 0)
    if long_rows not in LONG_ROWS:
        raise ConfigError(f"long_rows={long_rows!r} is not one of {', '.join(LONG_ROWS)}.")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 2):
        raise ConfigError(f"max_tokens={max_tokens!r} must be an integer >= 2 (or None for no limit).")
    if long_rows != "keep" and max_tokens is None:
        raise ConfigError(f"long_rows={long_rows!r} needs max_tokens (e.g. the model's block_size + 1).")
    check_int("batch_rows", batch_rows, 1)
