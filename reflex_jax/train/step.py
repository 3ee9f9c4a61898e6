"""The pure train step: module-level functions of (state, batch) and static settings (the eval
step's sums are in validation.py).

A batch is a dict of [B, S] arrays: `tokens` (int32; inputs [:, :-1], targets [:, 1:]), `mask`
(float32, the answer mask) and, for packed documents (data.document_mask), `segment_ids` and
`positions` (int32, see reflex_jax.data.documents); the eval step's batches add `valid`.

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


# jax's key implementations a run may draw its dropout masks with: threefry2x32 (the default,
# the same masks on every platform) or the TPU's hardware generator (rbg, unsafe_rbg)
RNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


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
    rng_impl: str = RNG_IMPLS[0]       # the dropout keys' generator
    kernels: KernelChoices = DEFAULT
    lora: Optional[Any] = None         # train/lora.py's LoraSpec: state.params are its adapters


def loss_weights(mask_BS, loss_on: str, valid_BS=None):
    """Per-target weights [B, S-1]: the answer mask (loss_on='answer') or ones, times `valid`."""
    w = mask_BS[:, 1:] if loss_on == "answer" else jnp.ones_like(mask_BS[:, 1:])
    return (w if valid_BS is None else w * valid_BS[:, 1:]).astype(jnp.float32)


DOCUMENT_KEYS = ("segment_ids", "positions")  # a batch's optional per-token model inputs


def document_inputs(batch: dict) -> dict:
    """The model's `segment_ids_BT` / `positions_BT` for a batch's inputs (those it has; none:
    one document per row)."""
    return {f"{k}_BT": batch[k][:, :-1] for k in DOCUMENT_KEYS if k in batch}


def hidden_states(s: StepSettings, params, batch: dict, rng=None, deterministic: bool = True):
    """The final normed hidden states [B, S-1, E] for the inputs batch["tokens"][:, :-1]."""
    return s.model.apply({"params": params}, batch["tokens"][:, :-1], **document_inputs(batch),
                         deterministic=deterministic,
                         rngs=None if deterministic else {"dropout": rng}, return_hidden=True)


def loss_sum(s: StepSettings, params, batch: dict, weights_BT, rng, deterministic: bool):
    """Weighted sum of next-token cross-entropies of the batch's tokens (inputs [:, :-1], targets
    [:, 1:])."""
    hidden_BTE = hidden_states(s, params, batch, rng, deterministic)
    with jax.named_scope("lm_head_loss"):  # a name for profiles (bench.py --profile)
        return weighted_cross_entropy_sum(hidden_BTE, head_matrix(s.model.cfg, params),
                                          batch["tokens"][:, 1:], weights_BT, s.kernels)


def _grads(s: StepSettings, params, batch: dict, weights_BT, rng, to_model=lambda p: p):
    """(loss sum, gradient sum) over the batch, micro-batch by micro-batch; `to_model` maps the
    trained params to the model's (LoRA: merges the adapters into the frozen base)."""
    deterministic = s.model.cfg.dropout == 0.0
    grad_fn = jax.value_and_grad(
        lambda p, b, w, r: loss_sum(s, to_model(p), b, w, r, deterministic))
    A = s.grad_accum
    if A == 1:
        return grad_fn(params, batch, weights_BT, rng)
    B = batch["tokens"].shape[0]
    # micro-batch a = rows a, a+A, ...: every data shard holds rows of every micro-batch
    split = lambda x: x.reshape(B // A, A, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731

    def body(carry, xs):
        l_acc, g_acc = carry
        i, b, w = xs
        l, g = grad_fn(params, b, w, jax.random.fold_in(rng, i))
        return (l_acc + l, jax.tree_util.tree_map(jnp.add, g_acc, g)), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    (loss, grads), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros),
        (jnp.arange(A), jax.tree_util.tree_map(split, batch), split(weights_BT)))
    return loss, grads


def train_step(s: StepSettings, tx: optax.GradientTransformation, schedule: Callable,
               state: TrainState, batch: dict, frozen=None):
    """One optimizer update on `batch` (tokens, mask and, packed, the document inputs); returns
    (new state, {loss, grad_norm, lr}). With `s.lora`, `state.params` are the adapters and
    `frozen` the base they are merged into (train/lora.py); only the adapters get gradients."""
    weights = loss_weights(batch["mask"], s.loss_on)
    total = jnp.maximum(jnp.sum(weights), 1.0)
    rng = jax.random.fold_in(jax.random.key(s.seed, impl=s.rng_impl), state.step)
    to_model = lambda p: p  # noqa: E731
    if s.lora is not None:
        from .lora import merge
        to_model = lambda p: merge(frozen, p, s.lora)  # noqa: E731
    loss, grads = _grads(s, state.params, batch, weights, rng, to_model)
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
