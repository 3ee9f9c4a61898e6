"""The head plans beyond the schedules (docs/attention.md#head-plans): GQA and per-layer K/V head
counts, cross-layer sharing (cla, yoco), the `fewer:` and `sharev:` variants, `route` and
`value_residual`: their head splits and KV bytes by hand, cached decoding against the full forward
pass, equivalences with plain models, training, sharding specs, conversion and the picture."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reflex_jax import ConfigError
from reflex_jax.kernels import KernelChoices
from reflex_jax.model import (Decoder, ModelConfig, init_cache, init_params, kv_bytes_per_token,
                              kv_cache_bytes, param_logical_axes, route_weights)
from reflex_jax.model.route import ROUTE_INIT_LOGIT, route_metrics
from decode_check import FAST, cached_and_full_logits
from marks import fast_only
from tolerance import order_atol

# the plain formulations (autodiff through XLA's ops) compile faster; training does not test kernels
PLAIN = KernelChoices(fused_loss=False, f32_linear=False, attention_blocks=False,
                      blockwise_backward=False)


def cfg68(reflex, **kw):
    return ModelConfig(n_layer=6, n_head=8, n_embd=64, vocab_size=100, block_size=16,
                       head_plan=reflex, **kw)


def small(reflex, **kw):
    """3 layers x 4 heads, head size 8."""
    base = dict(n_layer=3, n_head=4, n_embd=32, vocab_size=67, block_size=24, head_plan=reflex)
    base.update(kw)
    return ModelConfig(**base)


# ---- head splits and KV bytes, by hand ---------------------------------------------------------

# reflex -> (schedule_table, K heads per layer, V heads per layer); 6 x 8, D 8, float32: a K or V
# head costs 8 * 4 = 32 bytes per token.
SPLITS_6X8 = {
    "gqa:2": ("8/4kv | " * 6, [4] * 6, [4] * 6),
    "gqa:8": ("8/1kv | " * 6, [1] * 6, [1] * 6),
    "kv:8,7,6,5,4,3": ("8 | 8/7kv | 8/6kv | 8/5kv | 8/4kv | 8/3kv", [8, 7, 6, 5, 4, 3],
                       [8, 7, 6, 5, 4, 3]),
    "cla:2": ("8 | 0+8 | 8 | 0+8 | 8 | 0+8", [8, 0, 8, 0, 8, 0], [8, 0, 8, 0, 8, 0]),
    "yoco": ("8 | 8 | 8 | 0+8 | 0+8 | 0+8", [8, 8, 8, 0, 0, 0], [8, 8, 8, 0, 0, 0]),
    "fewer:all": ("8 | 7 | 6 | 5 | 4 | 3", [8, 7, 6, 5, 4, 3], [8, 7, 6, 5, 4, 3]),
    "fewer:recent:2,1": ("8 | 6 | 5 | 5 | 5 | 5", [8, 6, 5, 5, 5, 5], [8, 6, 5, 5, 5, 5]),
    "sharev:all": ("8 | 7+1v | 6+2v | 5+3v | 4+4v | 3+5v", [8] * 6, [8, 7, 6, 5, 4, 3]),
    "route": ("8 | 7+1r | 6+2r | 5+3r | 4+4r | 3+5r", [8, 7, 6, 5, 4, 3], [8, 7, 6, 5, 4, 3]),
}
BYTES_6X8 = {"gqa:2": 48 * 32, "gqa:8": 12 * 32, "kv:8,7,6,5,4,3": 66 * 32, "cla:2": 48 * 32,
             "yoco": 48 * 32, "fewer:all": 66 * 32, "fewer:recent:2,1": 68 * 32,
             "sharev:all": 81 * 32, "route": 66 * 32}


@pytest.mark.parametrize("reflex", list(SPLITS_6X8))
def test_6x8_head_split_and_kv_bytes_by_hand(reflex):
    c = cfg68(reflex)
    table, n_k, n_v = SPLITS_6X8[reflex]
    assert c.schedule_table() == f"{reflex} 6x8: " + table.rstrip(" |")
    assert [p.n_k for p in c.layers] == n_k and [p.n_v for p in c.layers] == n_v
    assert kv_bytes_per_token(c) == BYTES_6X8[reflex] == 32 * (sum(n_k) + sum(n_v))
    assert kv_bytes_per_token(c, "bfloat16") == BYTES_6X8[reflex] // 2


def test_6x8_plans_read_the_documented_heads():
    gqa = cfg68("gqa:2").layers[3]
    assert gqa.n_self == 8 and gqa.self_kv_heads == (0, 0, 1, 1, 2, 2, 3, 3) and not gqa.cross
    kv = cfg68("kv:8,7,6,5,4,3").layers
    assert kv[1].self_kv_heads == (0, 0, 1, 2, 3, 4, 5, 6)   # 8 heads on 7: the first group has 2
    assert kv[5].self_kv_heads == (0, 0, 0, 1, 1, 1, 2, 2)   # 8 heads on 3: groups 3, 3, 2
    cla = cfg68("cla:2").layers
    assert [(g.source, g.n_heads, g.source_heads) for g in cla[3].cross] == [(2, 8, tuple(range(8)))]
    assert [p.layer for p in cla if not p.n_kv] == [1, 3, 5]
    assert [g.source for p in cfg68("yoco").layers[3:] for g in p.cross] == [2, 2, 2]
    fewer = cfg68("fewer:all").layers
    assert [p.n_query for p in fewer] == [8, 7, 6, 5, 4, 3] and not any(p.cross for p in fewer)
    share = cfg68("sharev:all").layers[5]
    assert [(g.source, g.source_heads, g.share) for g in share.cross] == \
        [(4, (3,), "v"), (3, (4,), "v"), (2, (5,), "v"), (1, (6,), "v"), (0, (7,), "v")]
    route = cfg68("route").layers[3]
    assert [g.mixture for g in route.cross] == [((2, 5), (1, 6), (0, 7))] * 3
    assert [g.source for g in route.cross] == [2, 1, 0]  # the starting choice is all's
    assert cfg68("route").describe_schedule().splitlines()[3] == \
        "layer 3: 5 self; cross 3 routed over L2[5], L1[6], L0[7] (starting at L2, L1, L0)"
    assert cfg68("sharev:all").describe_schedule().splitlines()[1] == \
        "layer 1: 7 self; cross 1<-L0[V heads 7; own K]"
    assert cfg68("cla:2").describe_schedule().splitlines()[1] == \
        "layer 1: 0 self (no K/V projection); cross 8<-L0[heads 0,1,2,3,4,5,6,7]"


SPLITS_3X4 = {  # 3 x 4, D 8, float32: 32 bytes per K or V head
    "gqa:2": ([2, 2, 2], [2, 2, 2], [4, 4, 4]),   # (K heads, V heads, query heads)
    "gqa:4": ([1, 1, 1], [1, 1, 1], [4, 4, 4]),
    "kv:4,3,2": ([4, 3, 2], [4, 3, 2], [4, 4, 4]),
    "cla:2": ([4, 0, 4], [4, 0, 4], [4, 4, 4]),
    "yoco": ([4, 4, 0], [4, 4, 0], [4, 4, 4]),    # 3 layers: the lower half is layers 0 and 1
    "fewer:all": ([4, 3, 2], [4, 3, 2], [4, 3, 2]),
    "sharev:all": ([4, 4, 4], [4, 3, 2], [4, 4, 4]),
    "route": ([4, 3, 2], [4, 3, 2], [4, 4, 4]),
    "sharev:route": ([4, 4, 4], [4, 3, 2], [4, 4, 4]),
}


@pytest.mark.parametrize("reflex", list(SPLITS_3X4))
def test_3x4_heads_params_and_cache_allocate_what_the_plan_says(reflex):
    c = small(reflex)
    n_k, n_v, n_q = SPLITS_3X4[reflex]
    assert ([p.n_k for p in c.layers], [p.n_v for p in c.layers],
            [p.n_query for p in c.layers]) == (n_k, n_v, n_q)
    assert kv_bytes_per_token(c) == 32 * (sum(n_k) + sum(n_v))
    shapes = jax.eval_shape(lambda: init_params(c, jax.random.PRNGKey(0)))
    cache = jax.eval_shape(lambda: init_cache(c, 3, 10))
    for l, attn in enumerate(shapes[f"h_{l}"]["attn"] for l in range(3)):
        assert attn["q"]["kernel"].shape == (32, n_q[l], 8)
        assert attn["o"]["kernel"].shape == (n_q[l], 8, 32)
        for name, n in (("k", n_k[l]), ("v", n_v[l])):  # a borrowing layer has no K/V projection
            assert (attn[name]["kernel"].shape == (32, n, 8)) if n else name not in attn
        assert cache[l][0].shape == (3, n_k[l], 10, 8) and cache[l][1].shape == (3, n_v[l], 10, 8)
    nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(cache))
    assert nbytes == kv_cache_bytes(c, 3, 10) == 3 * 10 * kv_bytes_per_token(c)


def test_controls_match_the_kv_bytes_they_claim():
    assert kv_bytes_per_token(cfg68("kv:8,7,6,5,4,3")) == kv_bytes_per_token(cfg68("all"))
    for base in ("all", "recent:2,1", "((), ((0, 2),), ((1, 3),), (), (), ())"):
        assert kv_bytes_per_token(cfg68(f"fewer:{base}")) == kv_bytes_per_token(cfg68(base))
    assert kv_bytes_per_token(cfg68("fewer:((), ((0, 2),), ((1, 3),), (), (), ())")) == \
        32 * 2 * (8 + 6 + 5 + 8 + 8 + 8)
    for g in (1, 2, 4, 8):
        assert kv_bytes_per_token(cfg68(f"gqa:{g}")) == 2 * 6 * (8 // g) * 32
    assert cfg68("gqa:8").kv_heads_total == 6 and cfg68("sharev:all").kv_heads_total == 40.5


@pytest.mark.parametrize("reflex, kw, match", [
    ("((), ((0, 8),), ((1, 1),), (), (), ())", {},
     r"layer 2 reads from layer 1, which borrows all its heads and computes no K/V; a borrowing "
     r"layer cannot be a source"),
    ("fewer:((), ((0, 8),), ((1, 1),), (), (), ())", {}, r"borrows all its heads and computes no K/V"),
    ("sharev:((), ((0, 8),), ((1, 2),), (), (), ())", {}, r"layer 2 reads from layer 1, which borrows"),
    ("gqa:3", {}, r"'gqa:G' needs G >= 1 query heads per K/V head with G dividing n_head=8"),
    ("kv:8,7,6", {}, r"'kv:' needs one K/V head count per layer \(6 numbers, each in 1..8\)"),
    ("kv:8,7,6,5,4,9", {}, r"'kv:' needs one K/V head count per layer"),
    ("cla:1", {}, r"'cla:' takes one group size G >= 2"),
    ("fewer:cla:2", {}, r"layer 1 borrows all its heads, so without its cross heads it would have "
                        r"no query heads"),
    ("sharev:none", {}, r"the schedule has no cross heads, so there is no V to share"),
    ("fewer:", {}, r"'fewer:' needs a schedule after it"),
    ("kv:3,8,8,8,8,8", {"value_residual": True},
     r"model.value_residual: layer 1 has 8 V heads but layer 0 only 3"),
    ("none", {"value_residual": 1}, r"model.value_residual=1 must be True or False"),
    ("often", {}, r"model.head_plan='often' is unknown; use 'none', 'all'.*'sharev:<schedule>'"),
])
def test_bad_plans_fail_in_one_sentence(reflex, kw, match):
    with pytest.raises(ConfigError, match=match):
        cfg68(reflex, **kw)


def test_explicit_borrowing_layer_and_round_trip():
    c = cfg68("((), ((0, 8),), (), ((2, 8),), ((2, 3),), ())")
    assert c.schedule_table() == "explicit 6x8: 8 | 0+8 | 8 | 0+8 | 5+3 | 8"
    assert c.layers[4].cross[0].source_heads == (5, 6, 7)
    for reflex in ("route", "fewer:recent:2,1", "sharev:((), ((0, 1),), (), (), (), ())"):
        c = cfg68(reflex, value_residual=True)
        assert ModelConfig.from_dict(c.to_dict()) == c and c.layers == cfg68(reflex).layers


# ---- numerics ----------------------------------------------------------------------------------

def scaled_params(cfg, seed=0):
    # sharper attention than the default init, so that a wrong K/V shows in the logits (the route
    # logits and value mixes keep their documented start)
    params = init_params(cfg, jax.random.PRNGKey(seed))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x if path[-1].key in ("route_logits", "value_mix") else x * 4.0, params)


def tokens(seed, shape, vocab=67):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@functools.lru_cache(maxsize=None)
def _forward_fn(cfg):
    return jax.jit(lambda p, t: Decoder(cfg).apply({"params": p}, t), compiler_options=FAST)


def forward(cfg, params, toks):
    return np.asarray(_forward_fn(cfg)(params, toks))


# (reflex, n_layer, pos_emb, value_residual): every new plan, each position kind on some; 3 layers
# where the plan needs them (yoco's upper half, route's choice of 2 sources). kv:4,3 has K/V
# groups of two sizes (2, 1, 1), gqa:2 of one.
DECODE = [("gqa:2", 2, "rope", False), ("kv:4,3", 2, "learned", False),
          ("cla:2", 2, "learned", False), ("yoco", 3, "rope", False),
          ("fewer:all", 2, "learned", False), ("sharev:all", 2, "rope", False),
          ("route", 3, "learned", False), ("all", 2, "rope", True)]


@pytest.mark.parametrize("reflex,n_layer,pos_emb,vr", fast_only(DECODE, DECODE[3], unpack=True),
                         ids=str)
def test_cached_decoding_equals_full_recompute(reflex, n_layer, pos_emb, vr):
    """Left-padded prompts of different lengths prefilled, then fed one token at a time."""
    cfg = small(reflex, n_layer=n_layer, pos_emb=pos_emb, value_residual=vr)
    prompt_lens, n_decode, rng = [3, 6, 1], 4, np.random.default_rng(3)
    seqs = [rng.integers(0, cfg.vocab_size, n + n_decode) for n in prompt_lens]
    rows = cached_and_full_logits(cfg, scaled_params(cfg), seqs, prompt_lens, n_decode, 16)
    assert max(np.abs(ref).max() for _, ref in rows) > 1.0
    for got, ref in rows:
        np.testing.assert_allclose(got, ref, atol=order_atol(ref, cfg.n_layer), rtol=0)


def test_gqa_equals_vanilla_with_repeated_kv_heads():
    """kv:4,3 is `none` whose K/V heads within each group are copies of the group's head."""
    gqa, vanilla = small("kv:4,3", n_layer=2), small("none", n_layer=2)
    params = scaled_params(gqa)
    copied = jax.tree_util.tree_map(lambda x: x, params)
    for plan in gqa.layers:
        attn = copied[f"h_{plan.layer}"]["attn"]
        index = np.asarray(plan.self_kv_heads)
        for name in ("k", "v"):
            attn[name] = {"kernel": attn[name]["kernel"][:, index], "bias": attn[name]["bias"][index]}
    toks = tokens(5, (2, 10))
    want = forward(vanilla, copied, toks)
    np.testing.assert_allclose(forward(gqa, params, toks), want,
                               atol=order_atol(want, gqa.n_layer), rtol=0)


def test_fewer_equals_the_schedule_with_its_cross_heads_silenced():
    """fewer:all is `all` whose cross heads' output rows are zero (same self-head weights)."""
    fewer, full = small("fewer:all", n_layer=2), small("all", n_layer=2)
    params = scaled_params(fewer)
    padded = jax.tree_util.tree_map(lambda x: x, params)
    for plan in full.layers:
        attn, n = padded[f"h_{plan.layer}"]["attn"], plan.n_cross
        q, o = attn["q"], attn["o"]
        attn["q"] = {"kernel": jnp.pad(q["kernel"], ((0, 0), (0, n), (0, 0)), constant_values=1.0),
                     "bias": jnp.pad(q["bias"], ((0, n), (0, 0)))}
        attn["o"] = {"kernel": jnp.pad(o["kernel"], ((0, n), (0, 0), (0, 0))), "bias": o["bias"]}
    toks = tokens(6, (2, 10))
    want = forward(full, padded, toks)
    np.testing.assert_allclose(forward(fewer, params, toks), want,
                               atol=order_atol(want, full.n_layer), rtol=0)


def test_route_weights_sum_to_one_and_one_hot_routes_are_all():
    route, plain = small("route"), small("all")
    params = scaled_params(route)
    weights = route_weights(route, params)
    assert sorted(weights) == [1, 2]
    np.testing.assert_allclose(weights[2].sum(-1), 1.0, rtol=1e-6)
    start = np.exp(ROUTE_INIT_LOGIT) / (np.exp(ROUTE_INIT_LOGIT) + 1)  # 2 candidates at layer 2
    np.testing.assert_allclose(weights[2], [[start, 1 - start], [1 - start, start]], rtol=1e-5)
    assert route_metrics(route, params)["route/L2h1<-L0"] == pytest.approx(start)
    toks = tokens(7, (2, 10))
    # the default start is a mixture, not all's choice: the logits differ from all's ...
    without = {k: v for k, v in params.items()}
    for l in (1, 2):
        without[f"h_{l}"] = {**params[f"h_{l}"], "attn": {
            k: v for k, v in params[f"h_{l}"]["attn"].items() if k != "route_logits"}}
    assert np.abs(forward(route, params, toks) - forward(plain, without, toks)).max() > 1e-3
    # ... and one-hot routes at all's choice are exactly all
    hot = jax.tree_util.tree_map(lambda x: x, params)
    for l in (1, 2):
        hot[f"h_{l}"]["attn"]["route_logits"] = 1e4 * jnp.eye(l)
    want = forward(plain, without, toks)
    np.testing.assert_allclose(forward(route, hot, toks), want,
                               atol=order_atol(want, plain.n_layer), rtol=0)


def test_value_residual_at_1_0_is_the_plain_model():
    mixed, plain = small("sharev:all", value_residual=True), small("sharev:all")
    params = scaled_params(mixed)
    assert np.asarray(params["h_2"]["attn"]["value_mix"]).tolist() == [0.5, 0.5]
    assert "value_mix" not in params["h_0"]["attn"]
    toks = tokens(8, (2, 10))
    stripped = {k: v for k, v in params.items()}
    identity = jax.tree_util.tree_map(lambda x: x, params)
    for l in (1, 2):
        identity[f"h_{l}"]["attn"]["value_mix"] = jnp.array([1.0, 0.0])
        stripped[f"h_{l}"] = {**params[f"h_{l}"], "attn": {
            k: v for k, v in params[f"h_{l}"]["attn"].items() if k != "value_mix"}}
    np.testing.assert_array_equal(forward(mixed, identity, toks), forward(plain, stripped, toks))
    assert np.abs(forward(mixed, params, toks) - forward(plain, stripped, toks)).max() > 1e-3


def test_share_v_head_reads_its_own_k_and_the_sources_v_by_hand():
    """Layer 1 of sharev:all (3 self heads + 1 cross head) recomputed with loops."""
    cfg = small("sharev:all", n_layer=2)
    params = scaled_params(cfg)
    _, inter = jax.jit(lambda p, t: Decoder(cfg).apply(
        {"params": p}, t, capture_intermediates=True, mutable=["intermediates"]),
        compiler_options=FAST)(params, tokens(9, (1, 7)))
    inter = inter["intermediates"]
    own = [jax.tree_util.tree_map(np.asarray, inter[f"h_{l}"]["attn"]["__call__"][0][1])
           for l in range(2)]
    x = np.asarray(inter["h_1"]["ln_1"]["__call__"][0])[0]
    p = jax.tree_util.tree_map(np.asarray, params["h_1"]["attn"])
    q = np.einsum("te,ehd->thd", x, p["q"]["kernel"]) + p["q"]["bias"]
    (k1, v1), (_, v0) = (own[1][0][0], own[1][1][0]), (own[0][0][0], own[0][1][0])
    assert k1.shape[1] == 4 and v1.shape[1] == 3  # 3 self K/V heads + the cross head's own K
    sources = [(k1[:, h], v1[:, h]) for h in range(3)] + [(k1[:, 3], v0[:, 3])]
    T, D = x.shape[0], cfg.head_dim
    y = np.zeros((T, 4, D))
    for h, (k, v) in enumerate(sources):
        for t in range(T):
            s = k[:t + 1] @ q[t, h] / np.sqrt(D)
            w = np.exp(s - s.max())
            y[t, h] = (w / w.sum()) @ v[:t + 1]
    out = np.einsum("thd,hde->te", y, p["o"]["kernel"]) + p["o"]["bias"]
    np.testing.assert_allclose(np.asarray(inter["h_1"]["attn"]["__call__"][0][0])[0], out,
                               atol=order_atol(out, 2), rtol=0)  # layer 1's output: depth 2


# ---- training, sharding, conversion, the picture -----------------------------------------------

# (reflex, n_layer, value_residual)
TRAIN = [("gqa:2", 2, False), ("kv:4,3", 2, False), ("cla:2", 2, False), ("yoco", 3, False),
         ("fewer:all", 2, False), ("sharev:all", 2, False), ("route", 3, False), ("all", 2, True)]


@pytest.mark.parametrize("reflex,n_layer,vr", fast_only(TRAIN, TRAIN[6], unpack=True), ids=str)
def test_a_few_training_steps_lower_the_loss(reflex, n_layer, vr):
    cfg = small(reflex, n_layer=n_layer, value_residual=vr)
    params = init_params(cfg, jax.random.PRNGKey(0))
    toks = tokens(10, (4, 17))
    tx = optax.adam(1e-2)

    def loss(p):
        logits = Decoder(cfg, kernels=PLAIN).apply({"params": p}, toks[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

    @functools.partial(jax.jit, compiler_options=FAST)
    def train(p):
        def step(carry, _):
            p, s = carry
            value, grads = jax.value_and_grad(loss)(p)
            updates, s = tx.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), value
        (p, _), losses = jax.lax.scan(step, (p, tx.init(p)), None, length=8)
        return p, losses

    trained, losses = train(params)
    losses = np.asarray(losses)
    assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.3, losses
    if reflex == "route":  # the route moved and is still a distribution
        for w in route_weights(cfg, trained).values():
            np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
        assert not np.allclose(route_weights(cfg, trained)[2], route_weights(cfg, params)[2])
    if vr:
        assert not np.allclose(trained["h_1"]["attn"]["value_mix"], [0.5, 0.5])


class FakeMesh:
    shape = {"data": 1, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("reflex", ["gqa:2", "kv:4,3,2", "cla:2", "fewer:all", "sharev:all", "route"])
def test_sharding_specs_split_heads_only_where_they_divide(reflex):
    from jax.sharding import PartitionSpec as P

    from reflex_jax.sharding import spec_for
    cfg = small(reflex, value_residual=True)
    axes = param_logical_axes(cfg)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    flat_axes = dict(jax.tree_util.tree_flatten_with_path(
        axes, is_leaf=lambda x: isinstance(x, P))[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        spec = spec_for(flat_axes[path], leaf.shape, FakeMesh())
        for dim, part in zip(leaf.shape, tuple(spec)):
            parts = part if isinstance(part, tuple) else (part,) if part else ()
            assert dim % int(np.prod([FakeMesh.shape[a] for a in parts])) == 0, (path, spec)
    plan = cfg.layers[1]
    k = spec_for(axes["h_1"]["attn"]["k"]["kernel"], shapes["h_1"]["attn"]["k"]["kernel"].shape,
                 FakeMesh()) if plan.n_k else None
    if reflex == "gqa:2":
        assert k == P("fsdp", "tensor")  # 2 K/V heads split over tensor=2
    if reflex == "kv:4,3,2":
        assert k == P("fsdp")            # 3 K/V heads: replicated over tensor
    if reflex == "route":
        assert spec_for(axes["h_2"]["attn"]["route_logits"], (2, 2), FakeMesh()) == P()


@pytest.fixture(scope="module")
def gpt2_source():
    """A random 3 x 4 GPT-2 checkpoint (n_embd 32) built in memory, as load_gpt2 returns one."""
    from reflex_jax.interop.hf_source import Source
    rng = np.random.default_rng(0)
    E, L = 32, 3
    shapes = {"wte.weight": (50, E), "wpe.weight": (16, E), "ln_f.weight": (E,), "ln_f.bias": (E,)}
    for i in range(L):
        shapes.update({f"h.{i}.ln_1.weight": (E,), f"h.{i}.ln_1.bias": (E,),
                       f"h.{i}.attn.c_attn.weight": (E, 3 * E), f"h.{i}.attn.c_attn.bias": (3 * E,),
                       f"h.{i}.attn.c_proj.weight": (E, E), f"h.{i}.attn.c_proj.bias": (E,),
                       f"h.{i}.ln_2.weight": (E,), f"h.{i}.ln_2.bias": (E,),
                       f"h.{i}.mlp.c_fc.weight": (E, 4 * E), f"h.{i}.mlp.c_fc.bias": (4 * E,),
                       f"h.{i}.mlp.c_proj.weight": (4 * E, E), f"h.{i}.mlp.c_proj.bias": (E,)})
    tensors = {k: (0.3 * rng.standard_normal(v)).astype(np.float32) for k, v in shapes.items()}
    config = {"n_layer": L, "n_head": 4, "n_embd": E, "n_positions": 16, "vocab_size": 50}
    return Source("memory", "", None, config, tensors, ["memory"])


@pytest.mark.parametrize("reflex", ["gqa:2", "cla:2", "fewer:all", "sharev:all", "route"])
def test_conversion_maps_gpt2_onto_every_plan(gpt2_source, reflex):
    from reflex_jax.interop.hf_gpt2 import convert_gpt2, matching_config
    source = gpt2_source
    cfg = matching_config(source, head_plan=reflex, value_residual=True)
    params, report = convert_gpt2(cfg, source)
    E, D = 32, 8
    for plan in cfg.layers:
        attn, s = params[f"h_{plan.layer}"]["attn"], f"h.{plan.layer}.attn."
        W, B = source.tensors[s + "c_attn.weight"], source.tensors[s + "c_proj.weight"]
        np.testing.assert_array_equal(attn["q"]["kernel"].reshape(E, -1), W[:, :plan.n_query * D])
        np.testing.assert_array_equal(attn["o"]["kernel"].reshape(-1, E), B[:plan.n_query * D])
        for name, lo, n in (("k", E, plan.n_k), ("v", 2 * E, plan.n_v)):
            if n:
                np.testing.assert_array_equal(attn[name]["kernel"].reshape(E, -1), W[:, lo:lo + n * D])
            else:
                assert name not in attn
        if plan.layer and plan.n_v:  # a borrowing layer has no V to mix
            assert np.asarray(attn["value_mix"]).tolist() == [1.0, 0.0]
        if plan.routed:
            np.testing.assert_array_equal(attn["route_logits"], ROUTE_INIT_LOGIT * np.eye(plan.layer))
    notes = " ".join(report.notes)
    assert "value_mix is set to (1, 0)" in notes
    expected = {"gqa:2": "(GQA)", "cla:2": "layers 1 borrow every head", "fewer:all": "n_query Q heads",
                "sharev:all": "share-V cross heads", "route": "route_logits start as in training"}[reflex]
    assert expected in notes
    dropped_kv = sum(2 * (E - p.n_kv * D) * (E + 1) for p in cfg.layers) - \
        sum(p.n_own_k * D * (E + 1) for p in cfg.layers)
    dropped_q_o = sum((E - p.n_query * D) * (E + 1 + E) for p in cfg.layers)
    assert report.totals()["dropped"] == dropped_kv + dropped_q_o and report.totals()["new"] == 0


def test_schedule_picture_shows_every_variant():
    from reflex_lab.schedule_plot import (NO_HEAD, cell_labels, plot_schedule, source_head_matrix,
                                          source_matrix)
    fewer = cfg68("fewer:all")
    assert source_matrix(fewer)[5].tolist() == [5, 5, 5] + [NO_HEAD] * 5
    assert cell_labels(fewer)[0][5] == ["S", "S", "S", "", "", "", "", ""]
    assert source_head_matrix(cfg68("gqa:4"))[2].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert source_matrix(cfg68("cla:2"))[3].tolist() == [2] * 8
    labels, subs = cell_labels(cfg68("sharev:all"))
    assert labels[2][6:] == ["L1v", "L0v"] and subs[2][6:] == ["h6", "h7"]
    labels, subs = cell_labels(cfg68("route"))
    assert labels[3][5:] == ["R"] * 3 and subs[3][5:] == ["L0-2"] * 3
    pic = plot_schedule(cfg68("fewer:all"))
    assert np.allclose(pic.colors[5, 7], 1.0) and pic.labels[5][7] == ""


def test_train_flops_count_the_heads_each_plan_computes():
    """MFU's FLOPs (train/flops.py): Q and output projections over the layer's query heads, K and
    V over the heads it computes, attention over its query heads."""
    from reflex_jax.train.flops import attention_flops_per_token, matmul_params
    E, D, F, V = 64, 8, 256, 100
    mlp = 3 * E * F

    def by_hand(n_query, n_k, n_v):
        return V * E + sum(2 * E * q * D + E * (k + v) * D + mlp for q, k, v in zip(n_query, n_k, n_v))

    c = cfg68("gqa:4")  # 2 K/V heads per layer
    assert matmul_params(c) == by_hand([8] * 6, [2] * 6, [2] * 6)
    c = cfg68("fewer:all")  # layer l keeps 8 - l query heads and computes their K/V
    assert matmul_params(c) == by_hand([8, 7, 6, 5, 4, 3], [8, 7, 6, 5, 4, 3], [8, 7, 6, 5, 4, 3])
    assert attention_flops_per_token(c, 16) == 12 * (8 + 7 + 6 + 5 + 4 + 3) * D * 16
    c = cfg68("cla:2")  # layers 1, 3, 5 compute no K/V
    assert matmul_params(c) == by_hand([8] * 6, [8, 0] * 3, [8, 0] * 3)
    assert attention_flops_per_token(cfg68("all"), 16) == 12 * 6 * 8 * D * 16


def test_route_logits_get_no_weight_decay():
    from reflex_jax.model import abstract_params
    from reflex_jax.train.optim import decay_mask
    mask = decay_mask(abstract_params(cfg68("route", value_residual=True)))
    assert mask["h_3"]["attn"]["route_logits"] is False and mask["h_3"]["attn"]["q"]["kernel"] is True
