"""The fused loss equals the plain one: value and gradients, f32 and bf16, any chunking, weights,
also through a whole decoder."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reflex_jax.kernels.cross_entropy import (fused_cross_entropy_sum, fused_token_cross_entropy,
                                              token_cross_entropy)
from reflex_jax.model import ModelConfig

from marks import fast_only
from tolerance import order_atol


def _inputs(dtype, B=3, T=20, E=16, V=97):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    h = jax.random.normal(k[0], (B, T, E)).astype(dtype)
    head = jax.random.normal(k[1], (V, E)) * 0.5
    targets = jax.random.randint(k[2], (B, T), 0, V)
    weights = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
    return h, head, targets, weights


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("chunk_rows", fast_only([1, 7, 12, 10_000], 7, 10_000))
def test_fused_loss_equals_plain_loss(dtype, tol, chunk_rows):
    h, head, targets, weights = _inputs(dtype)

    def plain(h, head, w):
        return jnp.sum(token_cross_entropy(h, head, targets) * w)

    def fused(h, head, w):
        return fused_cross_entropy_sum(h, head, targets, w, chunk_rows)

    l0, g0 = jax.value_and_grad(plain, argnums=(0, 1, 2))(h, head, weights)
    l1, g1 = jax.value_and_grad(fused, argnums=(0, 1, 2))(h, head, weights)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    assert g1[0].dtype == h.dtype and g1[1].dtype == head.dtype
    for a, b in zip(g1, g0):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b))), (a, b)
    # also under jit, and scaled cotangent (the backward only rescales the saved gradient)
    g2 = jax.jit(jax.grad(lambda h: 3.0 * fused(h, head, weights)))(h)
    want = 3 * np.asarray(g1[0], np.float32)  # eager against jit: f32 rounding in another order
    np.testing.assert_allclose(np.asarray(g2, np.float32), want,
                               rtol=0 if dtype == jnp.float32 else 1e-2,
                               atol=order_atol(want) if dtype == jnp.float32 else 1e-2)
    # forward-only per-token losses (eval path); both round the operands alike, sum in float32
    want = np.asarray(token_cross_entropy(h, head, targets))
    np.testing.assert_allclose(np.asarray(fused_token_cross_entropy(h, head, targets, chunk_rows)),
                               want, atol=order_atol(want), rtol=0)


@pytest.mark.parametrize("V", fast_only([97, 128, 129], 97))
def test_vocabulary_padding_is_exact_when_every_logit_is_far_below_zero(V):
    """In bf16 the loss pads the head to a multiple of 128 rows. Zero pad rows would put the row
    max at 0 here (every real logit is about -60), and taking their exp terms back out of the sum
    would leave nothing but rounding: the pad rows must not be zeros. (h is bf16-exact; the head
    is f32 and rounded to bf16 for the matmuls on both paths.)"""
    h, head, targets, weights = _inputs(jnp.bfloat16, V=V)
    h = (jnp.abs(h) + 1.0).astype(jnp.bfloat16)
    head = -(jnp.abs(head) + 3.0)

    def plain(h, head):
        return jnp.sum(token_cross_entropy(h, head, targets) * weights)

    l0, g0 = jax.value_and_grad(plain, argnums=(0, 1))(h, head)
    l1, g1 = jax.value_and_grad(lambda h, head: fused_cross_entropy_sum(h, head, targets, weights),
                                argnums=(0, 1))(h, head)
    assert float(jnp.max(h[0].astype(jnp.float32) @ head.T)) < -40
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    for a, b in zip(g1, g0):  # bf16 gradients: the plain path rounds its own cotangents too
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 2e-2 * max(1.0, np.max(np.abs(b)))
    # per token: lse and the picked logit are both about -60, so a few float32 ulps of 60
    np.testing.assert_allclose(np.asarray(fused_token_cross_entropy(h, head, targets)),
                               np.asarray(token_cross_entropy(h, head, targets)), atol=1e-4)


@pytest.mark.slow
def test_fused_loss_under_a_model_gradient():
    """Gradients through the whole decoder (tied head) match the plain loss."""
    from reflex_jax.model import Decoder, head_matrix, init_params
    cfg = ModelConfig(vocab_size=61, block_size=16, n_layer=3, n_head=4, n_embd=32, head_plan="all")
    params = init_params(cfg, jax.random.PRNGKey(1))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 17), 0, 61)
    w = jnp.ones((2, 16))

    def loss(params, fused):
        h = Decoder(cfg).apply({"params": params}, tokens[:, :-1], return_hidden=True)
        if fused:
            return fused_cross_entropy_sum(h, head_matrix(cfg, params), tokens[:, 1:], w, 8)
        return jnp.sum(token_cross_entropy(h, head_matrix(cfg, params), tokens[:, 1:]) * w)

    g0 = jax.grad(loss)(params, False)
    g1 = jax.grad(loss)(params, True)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [512, 8])
@pytest.mark.parametrize("B, T, E", fast_only([(2, 16, 32), (2, 8, 9), (3, 21, 33)], (3, 21, 33),
                                               unpack=True))
def test_bf16_gradient_compiles_and_matches_with_one_chunk_or_many(chunk_rows, B, T, E):
    """Under jit in bf16, one chunk (B*T <= chunk_rows: no loop left for XLA) and several, with
    even and odd token / embedding sizes (each branch of the row-major copy): every dot of the
    d head path stays one XLA:CPU can run in bf16 (a folded transpose once made it fail with
    "Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32")."""
    h, head, targets, weights = _inputs(jnp.bfloat16, B=B, T=T, E=E, V=97)

    def grads(loss):
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(h, head)

    got = grads(lambda h, hd: fused_cross_entropy_sum(h, hd, targets, weights, chunk_rows))
    want = grads(lambda h, hd: jnp.sum(token_cross_entropy(h, hd, targets) * weights))
    for a, b in zip(got, want):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.max(np.abs(a - b)) <= 2e-2 * max(1.0, np.max(np.abs(b)))
