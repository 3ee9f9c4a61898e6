"""The pure train step: module-level functions of (state, batch) and static settings (the eval
step's sums are in validation.py).

One step = one optimizer update over the global batch, split into `grad_accum` micro-batches
scanned inside the compiled step. Params stay float32; the model computes in `model.dtype`; the
loss and its softmax are float32. Dropout keys come from (seed, step), so a resumed run repeats
exactly what an uninterrupted run would have done.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from ..kernels import DEFAULT, KernelChoices
from ..kernels.cross_entropy import weighted_cross_entropy_sum
from ..model import Decoder, head_matrix


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """What a compiled step is specialised on (static, hashable)."""
    model: Decoder
    loss_on: str = "all"               # all | answer
    grad_accum: int = 1
    seed: int = 0
    kernels: KernelChoices = DEFAULT


def loss_weights(mask_BS, loss_on: str, valid_BS=None):
    """Per-target weights [B, S-1]: the answer mask (loss_on='answer') or ones, times `valid`."""
    w = mask_BS[:, 1:] if loss_on == "answer" else jnp.ones_like(mask_BS[:, 1:])
    return (w if valid_BS is None else w * valid_BS[:, 1:]).astype(jnp.float32)


def hidden_states(s: StepSettings, params, tokens_BS, rng=None, deterministic: bool = True):
    """The final normed hidden states [B, S-1, E] for the inputs tokens_BS[:, :-1]."""
    return s.model.apply({"params": params}, tokens_BS[:, :-1], deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": rng}, return_hidden=True)


def loss_sum(s: StepSettings, params, tokens_BS, weights_BT, rng, deterministic: bool):
    """Weighted sum of next-token cross-entropies of `tokens_BS` (inputs [:, :-1], targets [:, 1:])."""
    hidden_BTE = hidden_states(s, params, tokens_BS, rng, deterministic)
    with jax.named_scope("lm_head_loss"):  # a name for profiles (bench.py --profile)
        return weighted_cross_entropy_sum(hidden_BTE, head_matrix(s.model.cfg, params),
                                          tokens_BS[:, 1:], weights_BT, s.kernels)


def _grads(s: StepSettings, params, tokens_BS, weights_BT, rng):
    """(loss sum, gradient sum) over the batch, micro-batch by micro-batch."""
    deterministic = s.model.cfg.dropout == 0.0
    grad_fn = jax.value_and_grad(lambda p, t, w, r: loss_sum(s, p, t, w, r, deterministic))
    A = s.grad_accum
    if A == 1:
        return grad_fn(params, tokens_BS, weights_BT, rng)
    B = tokens_BS.shape[0]
    # micro-batch a = rows a, a+A, ...: every data shard holds rows of every micro-batch
    split = lambda x: x.reshape(B // A, A, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731

    def body(carry, xs):
        l_acc, g_acc = carry
        i, tok, w = xs
        l, g = grad_fn(params, tok, w, jax.random.fold_in(rng, i))
        return (l_acc + l, jax.tree_util.tree_map(jnp.add, g_acc, g)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                    (jnp.arange(A), split(tokens_BS), split(weights_BT)))
    return loss, grads


def train_step(s: StepSettings, tx: optax.GradientTransformation, schedule: Callable,
               state: TrainState, tokens_BS, mask_BS):
    """One optimizer update; returns (new state, {loss, grad_norm, lr})."""
    weights = loss_weights(mask_BS, s.loss_on)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    rng = jax.random.fold_in(jax.random.PRNGKey(s.seed), state.step)
    loss, grads = _grads(s, state.params, tokens_BS, weights, rng)
    with jax.named_scope("optimizer"):  # a name for profiles (bench.py --profile)
        grads = jax.tree_util.tree_map(lambda g: g / total, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss / total, "grad_norm": optax.global_norm(grads),
                   "lr": schedule(state.step)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def init_state(model: Decoder, tx: optax.GradientTransformation, rng,
               params: Optional[Any] = None) -> TrainState:
    """Step 0: `params` (or fresh ones from `rng`) and the optimizer state."""
    if params is None:
        from ..model.decoder import boxed_params
        params = flax.linen.meta.unbox(boxed_params(model, rng))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
