"""The decoder implements docs/attention.md: causal cross heads over earlier layers' exported K/V."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reflex_jax import Decoder, ModelConfig, count_params, init_params
from reflex_jax.model import head_matrix, logits_from_hidden

from marks import fast_only
from tolerance import order_atol

PRESETS = ["none", "all", "recent:2,1", ((), ((0, 3),), ((1, 1), (0, 2)), ((2, 2), (0, 1)))]


def small(**kw):
    base = dict(n_layer=4, n_head=8, n_embd=64, vocab_size=61, block_size=16, norm="rmsnorm",
                mlp="swiglu")
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("pos_emb", fast_only(["learned", "rope"], "learned"))
@pytest.mark.parametrize("reflex", fast_only(PRESETS, "all"), ids=str)
def test_causal_for_every_preset(reflex, pos_emb):
    cfg = small(head_plan=reflex, pos_emb=pos_emb)
    params = init_params(cfg, jax.random.PRNGKey(1))
    fwd = jax.jit(lambda p, t: Decoder(cfg).apply({"params": p}, t))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, cfg.vocab_size)
    base = fwd(params, tokens)
    for t in (0, 5, 10):
        changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % cfg.vocab_size)
        out = fwd(params, changed)
        np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5, rtol=1e-5)
        assert np.abs(np.asarray(out[:, t + 1:] - base[:, t + 1:])).max() > 1e-3  # it did look


def _rope_np(x, pos, theta=10000.0):
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None]  # T, D/2
    c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


@pytest.mark.parametrize("pos_emb", fast_only(["learned", "rope"], "learned"))
def test_cross_head_by_hand(pos_emb):
    """Layer 2 of an explicit schedule, recomputed with loops from the K/V layers 0 and 1 exported."""
    cfg = small(n_layer=3, n_head=4, n_embd=32, head_plan=((), ((0, 1),), ((1, 1), (0, 2))),
                pos_emb=pos_emb)
    assert [p.n_self for p in cfg.layers] == [4, 3, 1]
    params = init_params(cfg, jax.random.PRNGKey(3))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 9), 0, cfg.vocab_size)
    _, inter = Decoder(cfg).apply({"params": params}, tokens, capture_intermediates=True,
                                  mutable=["intermediates"])
    inter = inter["intermediates"]
    exported = [jax.tree_util.tree_map(np.asarray, inter[f"h_{l}"]["attn"]["__call__"][0][1])
                for l in range(3)]
    out_model = np.asarray(inter["h_2"]["attn"]["__call__"][0][0])[0]
    x = np.asarray(inter["h_2"]["ln_1"]["__call__"][0])[0]  # attention input of layer 2, [T, E]
    p = jax.tree_util.tree_map(np.asarray, params["h_2"]["attn"])
    T, D = x.shape[0], cfg.head_dim
    q = np.einsum("te,ehd->thd", x, p["q"]["kernel"]) + p["q"]["bias"]
    if pos_emb == "rope":
        q = _rope_np(q, np.arange(T, dtype=np.float64))
    own_k, own_v = exported[2][0][0], exported[2][1][0]
    # Which K/V each of the 4 query heads reads (docs/attention.md): 1 self head; 1 head <- layer 1's last
    # self head (head 2); 2 heads <- layer 0's last two self heads (heads 2, 3).
    sources = [(own_k[:, 0], own_v[:, 0]),
               (exported[1][0][0][:, 2], exported[1][1][0][:, 2]),
               (exported[0][0][0][:, 2], exported[0][1][0][:, 2]),
               (exported[0][0][0][:, 3], exported[0][1][0][:, 3])]
    y = np.zeros((T, cfg.n_head, D))
    for h, (k, v) in enumerate(sources):
        for t in range(T):
            s = np.array([q[t, h] @ k[u] for u in range(t + 1)]) / np.sqrt(D)
            w = np.exp(s - s.max())
            w /= w.sum()
            y[t, h] = sum(w[u] * v[u] for u in range(t + 1))
    out = np.einsum("thd,hde->te", y, p["o"]["kernel"]) + p["o"]["bias"]
    np.testing.assert_allclose(out_model, out, atol=order_atol(out), rtol=0)  # one layer
    # the exported K of layer 0 is its own projection (rotated once, in its own layer)
    x0 = np.asarray(inter["h_0"]["ln_1"]["__call__"][0])[0]
    k_params = params["h_0"]["attn"]["k"]
    k0 = np.einsum("te,ehd->thd", x0, k_params["kernel"]) + k_params["bias"]
    if pos_emb == "rope":
        k0 = _rope_np(k0, np.arange(T, dtype=np.float64))
    np.testing.assert_allclose(exported[0][0][0], k0, atol=order_atol(k0), rtol=0)


def gpt2_param_count(V, P, L, E):
    return V * E + P * E + L * (12 * E * E + 13 * E) + 2 * E


@pytest.mark.parametrize("reflex", ["none", "all", "recent:2,1"])
def test_param_counts(reflex):
    kw = dict(n_layer=6, n_head=8, n_embd=64, vocab_size=97, block_size=32, norm="layernorm",
              mlp="gelu", bias=True, pos_emb="learned", tie_embeddings=True)
    vanilla = ModelConfig(**kw, head_plan="none")
    cfg = ModelConfig(**kw, head_plan=reflex)
    n_vanilla = count_params(jax.eval_shape(lambda: init_params(vanilla, jax.random.PRNGKey(0))))
    assert n_vanilla == gpt2_param_count(97, 32, 6, 64)
    n = count_params(jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))))
    missing_kv_heads = sum(cfg.n_head - p.n_self for p in cfg.layers)
    assert n_vanilla - n == missing_kv_heads * 2 * cfg.head_dim * (cfg.n_embd + 1)
    if reflex != "none":
        assert n < n_vanilla
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    for p in cfg.layers:  # K/V projections exist only for self heads; Q for all heads
        assert shapes[f"h_{p.layer}"]["attn"]["k"]["kernel"].shape == (64, p.n_self, 8)
        assert shapes[f"h_{p.layer}"]["attn"]["q"]["kernel"].shape == (64, 8, 8)


@pytest.mark.slow
def test_init_scales_follow_gpt2():
    cfg = small(n_layer=8, n_embd=128, vocab_size=512)
    p = init_params(cfg, jax.random.PRNGKey(0))
    assert abs(float(jnp.std(p["wte"])) - 0.02) < 0.002
    assert abs(float(jnp.std(p["h_3"]["attn"]["q"]["kernel"])) - 0.02) < 0.002
    resid = 0.02 / np.sqrt(2 * 8)
    assert abs(float(jnp.std(p["h_3"]["attn"]["o"]["kernel"])) - resid) < 0.1 * resid
    assert abs(float(jnp.std(p["h_3"]["mlp"]["down"]["kernel"])) - resid) < 0.1 * resid


@pytest.mark.parametrize("reflex", fast_only(["all", "recent:2,1"], "all"))
def test_jit_matches_eager_and_bf16_is_close(reflex):
    cfg = small(head_plan=reflex)
    params = init_params(cfg, jax.random.PRNGKey(5))
    tokens = jax.random.randint(jax.random.PRNGKey(6), (2, 16), 0, cfg.vocab_size)
    eager = Decoder(cfg).apply({"params": params}, tokens)
    jitted = jax.jit(lambda p, t: Decoder(cfg).apply({"params": p}, t))(params, tokens)
    assert eager.dtype == jnp.float32 and eager.shape == (2, 16, cfg.vocab_size)
    np.testing.assert_allclose(eager, jitted, atol=order_atol(eager, cfg.n_layer), rtol=0)
    bf16 = ModelConfig(**{**cfg.to_dict(), "dtype": "bfloat16"})
    out16 = jax.jit(lambda p, t: Decoder(bf16).apply({"params": p}, t))(params, tokens)
    assert out16.dtype == jnp.float32  # logits accumulate in float32
    assert bool(jnp.all(jnp.isfinite(out16)))
    err = float(jnp.abs(out16 - eager).max())
    assert err < 0.05 * float(jnp.abs(eager).max()) + 0.02, err
    p16 = jax.nn.softmax(out16)
    p32 = jax.nn.softmax(eager)
    assert float(jnp.abs(p16 - p32).max()) < 0.02


@pytest.mark.slow
def test_hidden_path_and_untied_head():
    cfg = small(tie_embeddings=False, norm="layernorm", mlp="gelu")
    params = init_params(cfg, jax.random.PRNGKey(7))
    assert params["lm_head"].shape == (cfg.n_embd, cfg.vocab_size)
    tokens = jax.random.randint(jax.random.PRNGKey(8), (2, 8), 0, cfg.vocab_size)
    logits = Decoder(cfg).apply({"params": params}, tokens)
    hidden = Decoder(cfg).apply({"params": params}, tokens, return_hidden=True)
    np.testing.assert_allclose(logits_from_hidden(hidden, head_matrix(cfg, params)), logits,
                               atol=order_atol(logits), rtol=0)  # the head's matmul


@pytest.mark.slow
def test_remat_and_dropout():
    cfg = small(dropout=0.5)
    params = init_params(cfg, jax.random.PRNGKey(9))
    tokens = jax.random.randint(jax.random.PRNGKey(10), (2, 8), 0, cfg.vocab_size)

    def loss(p, remat, rng):
        out = Decoder(cfg, remat=remat).apply({"params": p}, tokens, deterministic=False,
                                              rngs={"dropout": rng})
        return jnp.mean(out ** 2)

    rng = jax.random.PRNGKey(11)
    grad = jax.jit(jax.grad(loss), static_argnums=1)  # eager dispatch of every op is slow
    g1, g2 = grad(params, False, rng), grad(params, True, rng)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g1, g2)
    jloss = jax.jit(loss, static_argnums=1)
    assert float(jloss(params, False, rng)) != float(jloss(params, False, jax.random.PRNGKey(12)))
    apply = jax.jit(lambda p: Decoder(cfg).apply({"params": p}, tokens))
    np.testing.assert_array_equal(apply(params), apply(params))


def test_too_long_sequence_is_a_clear_error():
    cfg = small(block_size=8)
    params = init_params(cfg, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="exceeds model.block_size=8"):
        Decoder(cfg).apply({"params": params}, jnp.zeros((1, 9), jnp.int32))
