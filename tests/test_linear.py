"""The f32-accumulating linear (reflex_jax/kernels/linear.py): its written-out backward gives
autodiff's gradients of the plain dot, for one and two contracted axes, and accumulates in float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reflex_jax.kernels.linear import linear

from tolerance import order_atol


def _plain(x, kernel, bias, n_in):
    free = x.ndim - n_in
    y = jax.lax.dot_general(x, kernel, ((tuple(range(free, x.ndim)), tuple(range(n_in))), ((), ())))
    return y + bias


# (x shape, kernel shape, n_in): x smaller than the output gradient (up/gate, q/k/v), larger
# (down, and o over two input axes), and equal
@pytest.mark.parametrize("x_shape, k_shape, n_in", [
    ((2, 16, 8), (8, 32), 1), ((2, 16, 32), (32, 8), 1), ((2, 16, 4, 6), (4, 6, 8), 2),
    ((3, 5, 8), (8, 8), 1)])
def test_linear_value_and_grads_equal_the_plain_dot(x_shape, k_shape, n_in):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], x_shape)
    kernel = jax.random.normal(keys[1], k_shape)
    bias = jax.random.normal(keys[2], k_shape[n_in:])
    w = jax.random.normal(keys[3], x_shape[:x.ndim - n_in] + k_shape[n_in:])

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda x, k, b: jnp.sum(fn(x, k, b, n_in) * w), (0, 1, 2)))

    (got, got_g), (want, want_g) = loss(linear)(x, kernel, bias), loss(_plain)(x, kernel, bias)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    for a, b in zip(got_g, want_g):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=order_atol(b), rtol=0)


def test_bf16_linear_accumulates_in_float32():
    """bf16 operands, f32 accumulation: the kernel gradient of a long token sum stays within bf16
    rounding of the float32 result (a bf16-accumulated sum over 4096 tokens would not)."""
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    x = jax.random.normal(keys[0], (4, 1024, 32))
    kernel = jax.random.normal(keys[1], (32, 8)) * 0.1
    w = jax.random.normal(keys[2], (4, 1024, 8))
    grad = jax.jit(jax.grad(lambda x, k: jnp.sum(linear(x, k, None, 1).astype(jnp.float32) * w), 1))
    want = grad(x, kernel)
    got = grad(x.astype(jnp.bfloat16), kernel)
    assert got.dtype == jnp.float32
    rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert rel < 2e-2, rel
