"""Optimizer: weight decay only on matrices, warmup + cosine schedule, clipping."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from reflex_jax import ModelConfig, init_params
from reflex_jax.train.optim import decay_mask, lr_schedule, make_optimizer


def test_decay_mask_only_matrices():
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=50, block_size=8, norm="layernorm",
                      tie_embeddings=False)
    params = init_params(cfg, jax.random.PRNGKey(0))
    mask = decay_mask(params)
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["['h_0']['attn']['q']['kernel']"] is True
    assert flat["['h_1']['mlp']['down']['kernel']"] is True
    assert flat["['lm_head']"] is True
    for name in ("['wte']", "['wpe']", "['h_0']['attn']['q']['bias']", "['h_0']['ln_1']['scale']",
                 "['h_0']['ln_1']['bias']", "['ln_f']['scale']"):
        assert flat[name] is False, name
    with_emb = {jax.tree_util.keystr(k): v for k, v in
                jax.tree_util.tree_leaves_with_path(decay_mask(params, decay_embeddings=True))}
    assert with_emb["['wte']"] is True and with_emb["['h_0']['attn']['q']['bias']"] is False


def test_weight_decay_applies_where_masked():
    o = ConfigDict(dict(lr=0.1, min_lr=0.1, warmup_steps=0, b1=0.9, b2=0.98, eps=1e-8,
                        weight_decay=0.5, decay_embeddings=False, clip=1.0))
    tx, _ = make_optimizer(o, total_steps=10)
    params = {"wte": jnp.ones((4, 3)), "h_0": {"w": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}}
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    np.testing.assert_allclose(updates["h_0"]["w"]["kernel"], -0.1 * 0.5 * np.ones((3, 3)), rtol=1e-6)
    np.testing.assert_array_equal(updates["h_0"]["w"]["bias"], 0)
    np.testing.assert_array_equal(updates["wte"], 0)


def test_schedule_warmup_cosine_floor():
    s = lr_schedule(1e-3, 1e-5, 400, 10000)
    assert float(s(0)) == 0.0
    assert float(s(200)) == pytest.approx(5e-4)
    assert float(s(400)) == pytest.approx(1e-3)
    assert float(s(5200)) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-3)
    assert float(s(10000)) == pytest.approx(1e-5) and float(s(50000)) == pytest.approx(1e-5)


def test_clipping_bounds_the_update_and_bad_lr_is_refused():
    o = ConfigDict(dict(lr=1.0, min_lr=1.0, warmup_steps=0, b1=0.0, b2=0.0, eps=0.0,
                        weight_decay=0.0, decay_embeddings=False, clip=1.0))
    tx, _ = make_optimizer(o, total_steps=1)
    p = {"w": jnp.zeros(4)}
    clipped = tx.update({"w": jnp.full(4, 100.0)}, tx.init(p), p)[0]["w"]
    np.testing.assert_allclose(clipped, -np.ones(4), rtol=1e-5)  # Adam with b=0: sign of grad
    o.min_lr = 2.0
    with pytest.raises(ValueError, match="must satisfy 0 <= min_lr <= lr"):
        make_optimizer(o, total_steps=1)
