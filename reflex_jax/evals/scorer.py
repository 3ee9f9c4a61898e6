"""The one scoring path of every evaluation: rows of token ids through a jitted forward pass, in
fixed-shape batches, giving each target's cross-entropy and whether it was the argmax.

A model is `apply_fn(params, tokens_BT) -> logits_BTV` (any JAX-traceable function): the decoder
of a run (`decoder_apply`) or, in the tests, small oracles written as plain functions. Rows are
padded at the end to one length (a causal model's scores of the real tokens do not depend on what
follows them) and the batch to a fixed number of rows, so one evaluation compiles once.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError

# logits of one batch (float32): rows x length x vocab at most this many values, 256 MiB
LOGIT_BUDGET = 1 << 26
MAX_BATCH_ROWS = 32


class Scores(NamedTuple):
    """Per target of each row (row i's target t is its token t + 1, predicted from tokens 0..t):
    `ce` [N, L-1] float64 cross-entropy in nats, `hit` [N, L-1] bool (the target was the argmax),
    `valid` [N, L-1] bool (a real target, not padding)."""
    ce: np.ndarray
    hit: np.ndarray
    valid: np.ndarray


def decoder_apply(cfg) -> Callable:
    """`apply_fn` of the run's decoder: float32 logits of tokens at positions 0..T-1."""
    from ..model import Decoder
    model = Decoder(cfg)
    return lambda params, tokens_BT: model.apply({"params": params}, tokens_BT)


def _score_batch(apply_fn, params, tokens_BS):
    logits_BTV = apply_fn(params, tokens_BS[:, :-1]).astype(jnp.float32)
    targets_BT = tokens_BS[:, 1:]
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    ce_BT = -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return ce_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


class Scorer:
    """`scorer(rows) -> Scores` for rows of at most `block_size + 1` token ids each."""

    def __init__(self, apply_fn: Callable, params, *, block_size: int, vocab_size: int,
                 pad_id: int = 0, batch_size: Optional[int] = None):
        self.params, self.block_size, self.vocab_size = params, block_size, vocab_size
        self.pad_id, self.batch_size = pad_id, batch_size
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"--batch_size {batch_size} must be at least 1.")
        self._step = jax.jit(functools.partial(_score_batch, apply_fn))

    def rows_per_batch(self, length: int) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return int(max(1, min(MAX_BATCH_ROWS, LOGIT_BUDGET // (length * self.vocab_size))))

    def __call__(self, rows: Sequence[Sequence[int]]) -> Scores:
        if not len(rows):
            raise ValueError("no rows to score")
        lengths = np.array([len(r) for r in rows])
        length = int(lengths.max())
        if length > self.block_size + 1 or lengths.min() < 2:
            raise ValueError(f"rows must hold 2..{self.block_size + 1} tokens, got "
                             f"{lengths.min()}..{length}")
        b = self.rows_per_batch(length)
        n = -(-len(rows) // b) * b
        tokens = np.full((n, length), self.pad_id, np.int32)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = r
        outs = [self._step(self.params, tokens[i:i + b]) for i in range(0, n, b)]
        ce, hit = (np.concatenate([np.asarray(o[k]) for o in outs])[:len(rows)] for k in (0, 1))
        valid = np.arange(1, length)[None, :] < lengths[:, None]
        return Scores(ce.astype(np.float64), hit.astype(bool), valid)
