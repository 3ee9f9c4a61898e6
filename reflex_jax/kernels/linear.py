"""The f32-accumulating linear layer: y = x . kernel + bias with compute-dtype operands.

Forward and backward are written out so that every matmul has operands in the compute dtype and
a float32 result: XLA:CPU runs bf16 x bf16 -> f32 natively but bf16 x bf16 -> bf16 as an f32
matmul plus converts (about half the speed), and autodiff of a mixed dot would feed f32
cotangents into the backward matmuls. The kernel and bias gradients come out in float32, the
bias gradient as one f32-accumulated sum. In float32 this is exactly nn.DenseGeneral's math.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _dot_f32(a, b, contract_a: tuple, contract_b: tuple):
    return jax.lax.dot_general(a, b, ((contract_a, contract_b), ((), ())),
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def linear(x, kernel, bias, n_in: int):
    """x[..., in] . kernel[in, out] + bias[out] in x's dtype, accumulated in float32 (`n_in`:
    how many trailing axes of x are contracted; `bias` may be None)."""
    return _linear_fwd(x, kernel, bias, n_in)[0]


def _linear_fwd(x, kernel, bias, n_in):
    n_free = x.ndim - n_in
    y = _dot_f32(x, kernel.astype(x.dtype), tuple(range(n_free, x.ndim)), tuple(range(n_in)))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    # the kernel is a param (alive anyway): keep it, not a low-precision copy, for the backward
    return y.astype(x.dtype), (x, kernel, bias)


def _linear_bwd(n_in, res, g):
    x, kernel, bias = res
    g = g.astype(x.dtype)
    free = tuple(range(x.ndim - n_in))                 # x = [free..., in...]
    out = tuple(range(len(free), g.ndim))              # g = [free..., out...]
    dx = _dot_f32(g, kernel.astype(x.dtype), out, tuple(range(n_in, kernel.ndim)))
    if x.dtype == jnp.float32:
        # x as a 2-D [rows, in] array contracted on its first axis: XLA:CPU's float32 dot reads it
        # transposed in place, where the [B, T, in] contraction makes XLA copy x transposed first;
        # in bf16 this form is a slower f32 fallback matmul, so bf16 keeps the copy and the bf16
        # matmul (docs/bench.md has the step times)
        rows = math.prod(x.shape[:len(free)])
        dk = _dot_f32(x.reshape(rows, -1), g.reshape(rows, -1), (0,), (0,)).reshape(kernel.shape)
    else:
        dk = _dot_f32(x, g, free, free)
    db = None if bias is None else jnp.sum(g, axis=free, dtype=jnp.float32).astype(bias.dtype)
    return dx.astype(x.dtype), dk.astype(kernel.dtype), db


linear.defvjp(_linear_fwd, _linear_bwd)
