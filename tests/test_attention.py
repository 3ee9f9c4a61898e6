"""The attention op (reflex_jax/attention.py): CPU fast paths and the group-wise decode path
against plain dense attention."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reflex_jax import attention
from reflex_jax.config import ModelConfig


def test_blocked_causal_attention_equals_dense():
    """The CPU training path splits causal attention into query blocks (skipping masked key
    blocks); values and gradients equal one dense causal call."""
    T = 256
    assert attention.causal_blocks(T) == (2 if jax.default_backend() == "cpu" else 1)
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, T, 2, 8)) for i in range(3))
    w = jax.random.normal(jax.random.PRNGKey(5), (2, T, 2, 8))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    dense = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))
    blocked = loss(attention.multihead_attention)
    np.testing.assert_allclose(float(blocked(q, k, v)), float(dense(q, k, v)), rtol=1e-5)
    for a, b in zip(jax.grad(blocked, (0, 1, 2))(q, k, v), jax.grad(dense, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("t_len,offset", [(1, 37), (1, 0), (128, 0), (256, 0), (128, 64)])
def test_attention_fast_paths_equal_one_masked_call(t_len, offset):
    """Decode (one query: multiply + reduce), prefill into a longer cache (invisible slots cut) and
    query blocks give what one masked dot_product_attention call gives, padding mask included."""
    S = 320
    B = 1 if t_len == 1 else 2  # the single-query path is for batch 1
    q = jax.random.normal(jax.random.PRNGKey(0), (B, t_len, 2, 8))
    k, v = (jax.random.normal(jax.random.PRNGKey(i), (B, S, 2, 8)) for i in (1, 2))
    key_mask = (jnp.arange(S)[None, :] >= jnp.array([[5], [0]]))[:B]  # row 0 left-padded by 5
    mask = attention.attention_mask(t_len, S, offset, key_mask)
    # queries that see no key at all (left padding) have no meaningful output; compare the rest
    seen = np.asarray(mask.any(-1))[:, 0][:, :, None, None]  # [B, T, 1, 1]
    want = np.where(seen, jax.nn.dot_product_attention(q, k, v, mask=mask), 0)
    got = attention.multihead_attention(q, k, v, offset=offset, key_mask_BS=key_mask)
    np.testing.assert_allclose(np.where(seen, got, 0), want, rtol=1e-5, atol=1e-5)
    if t_len == 1:  # traced slot, as in the compiled decode loop
        got = jax.jit(lambda o: attention.multihead_attention(q, k, v, offset=o, key_mask_BS=key_mask))(offset)
        np.testing.assert_allclose(np.where(seen, got, 0), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reflex", ["all", "recent:2,1"])
@pytest.mark.parametrize("batch", [1, 3])
def test_group_wise_decode_equals_concatenated_kv(reflex, batch):
    """One query per row (cached decoding) attends group by group over the caches in place; every
    head must get what one call over the concatenated [own ++ borrowed] K/V gives, with a traced
    slot and a padding mask, for every layer of the schedule."""
    cfg = ModelConfig(n_layer=4, n_head=8, n_embd=64, vocab_size=16, block_size=64, reflex=reflex)
    S, D = 40, cfg.head_dim
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 64))
    caches = [tuple(jax.random.normal(next(keys), (batch, S, p.n_self, D)) for _ in range(2))
              for p in cfg.layers]
    key_mask = jnp.arange(S)[None, :] >= jnp.arange(batch)[:, None] * 3  # rows left-padded 0, 3, 6
    for layer, plan in enumerate(cfg.layers):
        q = jax.random.normal(next(keys), (batch, 1, cfg.n_head, D))
        own, earlier = caches[layer], tuple(caches[:layer])
        k, v = attention.gather_kv(own, earlier, plan)
        for offset in (0, 17, S - 1):
            want = jax.nn.dot_product_attention(
                q, k, v, mask=attention.attention_mask(1, S, offset, key_mask))
            got = jax.jit(lambda o: attention.reflex_attention(
                q, own, earlier, plan, offset=o, key_mask_BS=key_mask))(offset)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{reflex} layer {layer} slot {offset}")


def test_attention_backend_is_checked():
    """An unknown backend fails at config time; cuDNN off an NVIDIA GPU fails in one sentence."""
    with pytest.raises(ValueError, match=r"model.attention='flash' is unknown; use one of xla \| cudnn"):
        ModelConfig(attention="flash")
    if jax.default_backend() == "gpu":
        pytest.skip("cuDNN may be available here")
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="needs an NVIDIA GPU.*--config.model.attention=xla"):
        attention.multihead_attention(q, q, q, implementation="cudnn")
