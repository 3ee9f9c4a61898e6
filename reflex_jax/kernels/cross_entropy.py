"""Fused linear + cross-entropy that never materialises the [B*T, vocab] float32 logits.

`token_cross_entropy(h, head, targets)` below is the plain definition: logits = h @ head.T in
float32, then log-softmax. With vocab 50257 that is a [B*T, 50257] float32 array (411 MB at
B*T = 2048), plus a same-sized softmax gradient in the backward pass, plus the two big backward
matmuls reading it.

`fused_cross_entropy_sum(h, head, targets, weights)` returns the same number,
sum_t weights[t] * ce[t], but works on sequence chunks of at most `chunk_rows` tokens:

* forward (under `jax.grad`): for each chunk, logits in float32, logsumexp, and right away the
  gradient of the weighted loss, `(softmax - onehot) * weight`, cast to the compute dtype, which
  feeds the two backward matmuls of that chunk (d hidden, d head). Because the loss is the last op of
  the model, its cotangent is a scalar, so the backward pass only scales the saved gradients: no
  recomputation, the same 6 * N * vocab * E FLOPs as the plain loss.
* without differentiation (eval) only the chunked logsumexp runs.

Chunks run along the sequence axis (the batch axis stays whole), so a batch sharded over devices
stays sharded. In a 16-bit compute dtype the head's rows are padded to a multiple of
`VOCAB_ALIGN` inside the loss (see `_aligned_head`); the pad columns never reach the result. The
d head accumulator is float32 and held transposed ([E, V], transposed once at the end). Matmuls
take the compute dtype of `h` with float32 accumulation, exactly like
`model.decoder.logits_from_hidden`; in bfloat16 the softmax gradient is rounded to bfloat16 before
its two matmuls (what a bfloat16 autocast backward does too).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import DEFAULT, KernelChoices

DEFAULT_CHUNK_ROWS = 512  # tokens per chunk: [512, 50257] float32 = 103 MB of transient logits
VOCAB_ALIGN = 128  # the head's rows are padded to a multiple of this inside the loss


def _chunk_len(batch: int, seq: int, chunk_rows: int) -> int:
    """Largest divisor of `seq` with batch * divisor <= chunk_rows (at least 1)."""
    target = max(1, chunk_rows // max(batch, 1))
    for c in range(min(seq, target), 0, -1):
        if seq % c == 0:
            return c
    return 1


def _split(x, c):
    """[B, T, ...] -> [T/c, B, c, ...] (chunks along the sequence axis first)."""
    B, T = x.shape[:2]
    return jnp.swapaxes(x.reshape(B, T // c, c, *x.shape[2:]), 0, 1)


def _unsplit(x):
    """Inverse of `_split`."""
    n, B, c = x.shape[:3]
    return jnp.swapaxes(x, 0, 1).reshape(B, n * c, *x.shape[3:])


def _logits(h, head):
    return jnp.einsum("bte,ve->btv", h, head.astype(h.dtype), preferred_element_type=jnp.float32)


def _picked(h, head, targets):
    """logits[b, t, targets[b, t]] without the full logits (same float32 accumulation)."""
    rows = jnp.take(head, targets, axis=0).astype(h.dtype)
    return jnp.sum(h.astype(jnp.float32) * rows.astype(jnp.float32), axis=-1)


def _row_major_transpose(x):
    """x.T of a 2-D [n, m] array as a row-major copy. XLA:CPU's bf16 matmul (YNNPACK) takes only
    row-major operands, the left one contracted on its last axis; a transpose reaches XLA as a
    column-major view, which sends the dot to a float32 fallback (5x slower) or, where XLA folds
    it into the dot, to one that has no bf16 x bf16 -> f32 ("Unsupported element type for
    DotThunk::Execute"). A reshape that splits an axis of the view (either, whichever is even)
    cannot be a bitcast, so it is a real row-major copy, and the barrier keeps XLA from folding
    the pair away."""
    n, m = x.shape
    if m % 2 == 0:
        split = (2, m // 2, n)
    elif n % 2 == 0:
        split = (m, 2, n // 2)
    else:
        split = (m, 1, n)
    return jax.lax.optimization_barrier(x.T.reshape(split)).reshape(m, n)


def _aligned_head(head_VE):
    """(head with its rows padded to a multiple of VOCAB_ALIGN, number of pad rows), for a
    16-bit head (the compute dtype).

    A 50257-wide vocabulary axis leaves every logits row misaligned, and XLA:CPU's bf16 matmuls
    then run far below their speed (docs/bench.md has the loss and step times with and without
    the padding). The pad rows are copies of row 0, not zeros: the row max then stays a real
    logit, and the pads' share of the exp sum is exactly n_pad * exp(logits[:, 0] - max), which
    `_max_exp_sum` takes out again without cancellation (it is at most n_pad times one of the
    sum's own terms)."""
    # float32 is left as it is: there the padding did not change the step (docs/bench.md) and its
    # float32 copies of the head only add temporaries
    n_pad = -head_VE.shape[0] % VOCAB_ALIGN if jnp.dtype(head_VE.dtype).itemsize < 4 else 0
    if n_pad:
        head_VE = jnp.concatenate(
            [head_VE, jnp.broadcast_to(head_VE[:1], (n_pad, head_VE.shape[1]))], axis=0)
    return head_VE, n_pad


def _max_exp_sum(logits, n_pad: int = 0):
    """(row max, exp(logits - max), row sum of that over the real columns), keepdims, for logits
    of an `_aligned_head` with `n_pad` pad columns at the end (copies of column 0): one exp pass
    serves both the logsumexp and the softmax (faster on XLA:CPU than logsumexp and a second exp;
    docs/bench.md)."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    if n_pad:
        s = s - n_pad * e[..., :1]
    return m, e, s


def _real_columns(x, n_pad: int):
    """x with its last `n_pad` columns set to 0 (they belong to pad rows of the head)."""
    if not n_pad:
        return x
    cols = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.where(cols < x.shape[-1] - n_pad, x, jnp.zeros((), x.dtype))


def _lse_chunks(h, head, c):
    """Per-token logsumexp [B, T] computed chunk by chunk."""
    head, n_pad = _aligned_head(head.astype(h.dtype))

    def body(_, h_c):
        m, _, s = _max_exp_sum(_logits(h_c, head), n_pad)
        return None, (m + jnp.log(s))[..., 0]
    _, lse = jax.lax.scan(body, None, _split(h, c))
    return _unsplit(lse)


def fused_token_cross_entropy(h_BTE, head_VE, targets_BT, chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """Per-token cross-entropy [B, T] in float32 without [B*T, V] logits (not differentiable
    cheaply: use `fused_cross_entropy_sum` under `jax.grad`)."""
    c = _chunk_len(*targets_BT.shape, chunk_rows)
    return _lse_chunks(h_BTE, head_VE, c) - _picked(h_BTE, head_VE, targets_BT)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ce_sum(h_BTE, head_VE, targets_BT, weights_BT, chunk_rows):
    ce = fused_token_cross_entropy(h_BTE, head_VE, targets_BT, chunk_rows)
    return jnp.sum(ce * weights_BT)


def _ce_sum_fwd(h_BTE, head_VE, targets_BT, weights_BT, chunk_rows):
    B, T, E = h_BTE.shape
    c = _chunk_len(B, T, chunk_rows)
    dt = h_BTE.dtype
    V = head_VE.shape[0]
    head_c, n_pad = _aligned_head(head_VE.astype(dt))                  # [Vp, E], Vp >= V
    w32 = weights_BT.astype(jnp.float32)

    def body(dhead_EV, xs):
        h_c, w_c = xs  # [B, c, E], [B, c]
        logits = _logits(h_c, head_c)                                   # [B, c, Vp] float32
        m, e, s = _max_exp_sum(logits, n_pad)
        lse = (m + jnp.log(s))[..., 0]                                  # [B, c]
        # softmax * weight, 0 in the pad columns; the onehot part of (softmax - onehot) goes in
        # below, as a gather / scatter of E-rows
        dlogits = _real_columns(e * (w_c[..., None] / s), n_pad).astype(dt)
        dh_c = jnp.einsum("btv,ve->bte", dlogits, head_c, preferred_element_type=jnp.float32)
        # d head transposed, [E, V] = h_c^T . dlogits: this dot transposes the [B*c, E] chunk of
        # h, not the [B*c, V] dlogits (faster in both dtypes; docs/bench.md has the step times)
        h_T = _row_major_transpose(h_c.reshape(-1, E))
        dhead_EV = dhead_EV + jax.lax.dot_general(
            h_T, dlogits.reshape(-1, dlogits.shape[-1]), (((1,), (0,)), ((), ())),
            preferred_element_type=jnp.float32)
        return dhead_EV, (lse, dh_c)

    dhead0 = jnp.zeros(head_c.shape[::-1], jnp.float32)
    dhead_EV, (lse, dh) = jax.lax.scan(body, dhead0, (_split(h_BTE, c), _split(w32, c)))
    # the barrier keeps XLA from folding this transpose into the dot (non-canonical: see above)
    dhead = jax.lax.optimization_barrier(dhead_EV).T[:V]
    lse, dh = _unsplit(lse), _unsplit(dh)
    picked = _picked(h_BTE, head_VE, targets_BT)
    ce = lse - picked
    loss = jnp.sum(ce * w32)
    # onehot part: d/dh of -picked is -head[target], d/dhead[target] of -picked is -h
    rows = jnp.take(head_c, targets_BT, axis=0).astype(jnp.float32)
    dh = dh - w32[..., None] * rows
    dhead = dhead.at[targets_BT.reshape(-1)].add(
        -(w32[..., None] * h_BTE.astype(jnp.float32)).reshape(B * T, E))
    return loss, (dh.astype(dt), dhead.astype(head_VE.dtype), ce)


def _ce_sum_bwd(chunk_rows, res, g):
    dh, dhead, ce = res
    return (g * dh).astype(dh.dtype), (g * dhead).astype(dhead.dtype), None, g * ce


_ce_sum.defvjp(_ce_sum_fwd, _ce_sum_bwd)


def fused_cross_entropy_sum(h_BTE, head_VE, targets_BT, weights_BT,
                            chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """sum(weights * cross_entropy(h @ head.T, targets)) in float32; see the module docstring.

    h_BTE: final hidden states (compute dtype); head_VE: [vocab, embed] output matrix (any float
    dtype, cast to h's dtype for the matmuls, gradient returned in its own dtype); targets_BT: int
    token ids; weights_BT: per-token loss weights (not differentiated in practice, but its gradient,
    the per-token loss, is exact).
    """
    return _ce_sum(h_BTE, head_VE, targets_BT, weights_BT.astype(jnp.float32), int(chunk_rows))


def token_cross_entropy(h_BTE, head_VE, targets_BT):
    """Per-token cross-entropy [B, T] in float32, the plain definition: full float32 logits,
    then logsumexp minus the target's logit."""
    logits = jnp.einsum("bte,ve->btv", h_BTE, head_VE.astype(h_BTE.dtype),
                        preferred_element_type=jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return lse - picked


def per_token_cross_entropy(h_BTE, head_VE, targets_BT, kernels: KernelChoices = DEFAULT):
    """Per-token cross-entropy [B, T] in float32 (no gradient path): the chunked kernel, or with
    `kernels.fused_loss` off the plain formulation."""
    if kernels.fused_loss:
        return fused_token_cross_entropy(h_BTE, head_VE, targets_BT)
    return token_cross_entropy(h_BTE, head_VE, targets_BT)


def weighted_cross_entropy_sum(h_BTE, head_VE, targets_BT, weights_BT,
                               kernels: KernelChoices = DEFAULT):
    """sum(weights * cross_entropy) in float32: the fused kernel, or with `kernels.fused_loss`
    off the plain formulation (what XLA's autodiff gets by itself)."""
    if kernels.fused_loss:
        return fused_cross_entropy_sum(h_BTE, head_VE, targets_BT, weights_BT)
    return jnp.sum(token_cross_entropy(h_BTE, head_VE, targets_BT) * weights_BT)
