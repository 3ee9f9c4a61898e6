"""The attention kernels (reflex_jax/kernels/) and the reflex K/V op (reflex_jax/model/kv.py):
CPU fast paths and the group-wise decode path against plain dense attention."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reflex_jax.kernels import KernelChoices, attention, cpu_attention
from reflex_jax.model import ModelConfig, decoder, kv

from marks import fast_only
from tolerance import order_atol


def _weighted_loss(fn, w):
    return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)


def _dense_causal(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("T", fast_only([128, 256, 1024], 128))
def test_blockwise_causal_attention_equals_dense(T):
    """The CPU training path (query blocks over the visible keys, written-out backward from the
    saved log-sum-exp): values and all three gradients equal autodiff through one dense causal
    call, in float32; multihead_attention takes this path for plain causal calls on CPU."""
    assert cpu_attention.flash_query_block(T) == (64 if T < 1024 else 128)
    assert cpu_attention.flash_query_block(192 + 32) == 0 and cpu_attention.flash_query_block(64) == 0
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, T, 3, 8)) for i in range(3))
    w = jax.random.normal(jax.random.PRNGKey(5), (2, T, 3, 8))
    dense = _weighted_loss(_dense_causal, w)
    want, want_grads = jax.jit(jax.value_and_grad(dense, (0, 1, 2)))(q, k, v)
    for blockwise in (_weighted_loss(
            lambda q, k, v: cpu_attention.blockwise_causal_attention(q, k, v, 64), w),
                      _weighted_loss(attention.multihead_attention, w)):
        # jit: eager dispatch of the per-block ops took most of this test's time
        got, grads = jax.jit(jax.value_and_grad(blockwise, (0, 1, 2)))(q, k, v)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
        for a, b in zip(grads, want_grads):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


def test_blockwise_causal_attention_bf16_error_matches_dense():
    """In bfloat16 (operands bf16, accumulation f32) the blockwise op is no further from the
    float32 result than XLA's dense bf16 attention is, for the output and every gradient."""
    T = 256
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, T, 4, 16)) for i in range(3))
    w = jax.random.normal(jax.random.PRNGKey(5), (2, T, 4, 16))
    bf = lambda x: x.astype(jnp.bfloat16)  # noqa: E731
    fns = {"blockwise": lambda q, k, v: cpu_attention.blockwise_causal_attention(q, k, v, 64),
           "dense": _dense_causal}
    truth = jax.jit(jax.value_and_grad(_weighted_loss(_dense_causal, w), (0, 1, 2)))(q, k, v)
    errors = {}
    for name, fn in fns.items():
        out = jax.jit(jax.value_and_grad(_weighted_loss(fn, w), (0, 1, 2)))(bf(q), bf(k), bf(v))
        errors[name] = [abs(float(out[0]) - float(truth[0]))] + [
            float(jnp.sqrt(jnp.mean((g.astype(jnp.float32) - t) ** 2))) for g, t in zip(out[1], truth[1])]
    for mine, ref in zip(errors["blockwise"], errors["dense"]):
        assert mine <= 1.5 * ref + 1e-3, errors


@pytest.mark.parametrize("t_len,offset", fast_only([(1, 37), (1, 0), (128, 0), (256, 0), (128, 64)],
                                                   (1, 37), unpack=True))
def test_attention_fast_paths_equal_one_masked_call(t_len, offset):
    """Decode (one query), prefill into a longer cache (invisible slots cut) and query blocks give
    what one masked dot_product_attention call gives, padding mask included."""
    S, B = 320, 2
    q = jax.random.normal(jax.random.PRNGKey(0), (B, t_len, 2, 8))
    k, v = (jax.random.normal(jax.random.PRNGKey(i), (B, S, 2, 8)) for i in (1, 2))
    key_mask = (jnp.arange(S)[None, :] >= jnp.array([[5], [0]]))[:B]  # row 0 left-padded by 5
    mask = attention.attention_mask(t_len, S, offset, key_mask)
    # queries that see no key at all (left padding) have no meaningful output; compare the rest
    seen = np.asarray(mask.any(-1))[:, 0][:, :, None, None]  # [B, T, 1, 1]
    want = np.where(seen, jax.nn.dot_product_attention(q, k, v, mask=mask), 0)
    got = attention.multihead_attention(q, k, v, offset=offset, key_mask_BS=key_mask)
    np.testing.assert_allclose(np.where(seen, got, 0), want, atol=order_atol(want), rtol=0)
    if t_len == 1:  # traced slot, as in the compiled decode loop
        got = jax.jit(lambda o: attention.multihead_attention(q, k, v, offset=o,
                                                              key_mask_BS=key_mask))(offset)
        np.testing.assert_allclose(np.where(seen, got, 0), want, atol=order_atol(want), rtol=0)
        # the cached decoding kernel reads head-major [B, K, S, D] caches: the same values
        head_major = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        got = attention.cached_query_attention(q, head_major(k), head_major(v), mask)
        np.testing.assert_allclose(np.where(seen, got, 0), want, atol=order_atol(want), rtol=0)
        # GQA: 6 query heads over 2 K/V heads, each group of 3 consecutive heads on one
        q6 = jax.random.normal(jax.random.PRNGKey(3), (B, 1, 6, 8))
        want6 = jax.nn.dot_product_attention(q6, k, v, mask=mask)
        got6 = attention.cached_query_attention(q6, head_major(k), head_major(v), mask)
        want6 = np.where(seen, want6, 0)
        np.testing.assert_allclose(np.where(seen, got6, 0), want6, atol=order_atol(want6), rtol=0)


@pytest.mark.parametrize("reflex", ["all", "recent:2,1"])
@pytest.mark.parametrize("batch", fast_only([1, 3], 3))
def test_group_wise_decode_equals_concatenated_kv(reflex, batch):
    """One query per row (cached decoding) attends group by group over the caches in place; every
    head must get what one call over the concatenated [own ++ borrowed] K/V gives, with a traced
    slot and a padding mask, for every layer of the schedule."""
    cfg = ModelConfig(n_layer=4, n_head=8, n_embd=64, vocab_size=16, block_size=64, head_plan=reflex)
    S, D = 40, cfg.head_dim
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 64))
    caches = [tuple(jax.random.normal(next(keys), (batch, S, p.n_self, D)) for _ in range(2))
              for p in cfg.layers]
    key_mask = jnp.arange(S)[None, :] >= jnp.arange(batch)[:, None] * 3  # rows left-padded 0, 3, 6
    for layer, plan in enumerate(cfg.layers):
        q = jax.random.normal(next(keys), (batch, 1, cfg.n_head, D))
        own, earlier = caches[layer], tuple(caches[:layer])
        k, v = kv.gather_kv(own, earlier, plan)
        # one compile per layer, the slot traced as in the compiled decode loop
        attend = jax.jit(functools.partial(kv.reflex_attention, q, own, earlier, plan,
                                           key_mask_BS=key_mask))
        for offset in (0, 17, S - 1):
            want = jax.nn.dot_product_attention(
                q, k, v, mask=attention.attention_mask(1, S, offset, key_mask))
            got = attend(offset=offset)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=order_atol(want),
                                       rtol=0, err_msg=f"{reflex} layer {layer} slot {offset}")


SPLIT_PLANS = ["all", "recent:2,1", "sharev:all", "route"]  # each reads part of a source


@pytest.mark.parametrize("reflex", fast_only(SPLIT_PLANS, "all", "route"))
def test_borrowed_heads_read_from_split_sources_give_the_sliced_gradients(reflex, monkeypatch):
    """Later layers read a source's K/V from pieces split where their head ranges begin and end
    (kv.HeadRanges), so that no reader's gradient is padded back to the source's size: the same
    loss and gradients as slicing each reader's heads out of the whole array, and not one pad
    of K/V left in the backward, where slicing pads once per reader."""
    cfg = ModelConfig(n_layer=4, n_head=8, n_embd=64, vocab_size=32, block_size=16,
                      head_plan=reflex, dtype="float32")
    model = decoder.Decoder(cfg)
    params = decoder.init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    w = jax.random.normal(jax.random.PRNGKey(2), (2, 16, cfg.n_embd))

    def pads_and_gradients():  # a new function each time: JAX caches traces by function
        grad = jax.value_and_grad(
            lambda p: jnp.sum(model.apply({"params": p}, tokens, return_hidden=True) * w))
        kv_pads = re.findall(r"f32\[2,16,\d+,8\] = pad\[", str(jax.make_jaxpr(grad)(params)))
        return len(kv_pads), jax.jit(grad)(params)

    split_pads, (split_loss, split) = pads_and_gradients()
    monkeypatch.setattr(decoder, "reader_starts", lambda plans: {})  # every reader slices
    sliced_pads, (sliced_loss, sliced) = pads_and_gradients()
    assert split_pads == 0 and sliced_pads > 0, (split_pads, sliced_pads)
    np.testing.assert_allclose(split_loss, sliced_loss, rtol=1e-6)
    # one scale for all leaves: the K biases' gradients are zero up to the rounding of the sums
    # that cancel in them (softmax ignores a shift of all keys)
    atol = order_atol(max(np.abs(b).max() for b in jax.tree_util.tree_leaves(sliced)), cfg.n_layer)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(split),
                            jax.tree_util.tree_leaves(sliced)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0,
                                   err_msg=jax.tree_util.keystr(path))


def test_head_ranges_are_read_only_whole():
    """A HeadRanges piece is never cut again: a range that is not a union of whole pieces is an
    error, where a slice would silently pad the gradient again."""
    x = jnp.arange(2 * 3 * 8 * 4, dtype=jnp.float32).reshape(2, 3, 8, 4)
    split = kv.split_heads(x, (0, 5, 7))
    for lo, hi in ((0, 5), (5, 8), (7, 8), (0, 8), (5, 7)):
        np.testing.assert_array_equal(kv._heads(split, lo, hi, 2), x[:, :, lo:hi])
    for lo, hi in ((1, 5), (5, 6)):
        with pytest.raises(ValueError, match="split"):
            kv._heads(split, lo, hi, 2)
    assert kv.split_heads(x, (0, 8)) is x  # one range: the array itself


def test_attention_backend_is_checked():
    """An unknown backend fails at config time; cuDNN or the Pallas TPU kernel asked for a step
    compiled for another platform fails in one sentence naming that platform."""
    with pytest.raises(ValueError, match=r"model.attention='flashy' is unknown; "
                                         r"use one of auto \| xla \| cudnn \| flash"):
        ModelConfig(attention="flashy")
    assert ModelConfig().attention == "auto"
    assert ModelConfig.from_dict(dict(ModelConfig().to_dict(), attention="xla")).attention == "xla"
    q = jnp.zeros((1, 4, 2, 8))
    for platform in ("cpu", "tpu"):
        with pytest.raises(ValueError, match=f"needs an NVIDIA GPU, but the step is compiled for "
                                             f"{platform}.*--config.model.attention=xla"):
            attention.multihead_attention(q, q, q, implementation="cudnn",
                                          kernels=KernelChoices(platform=platform))
    for platform in ("cpu", "gpu"):
        with pytest.raises(ValueError, match=f"needs a TPU, but the step is compiled for {platform}"):
            attention.multihead_attention(q, q, q, implementation="flash",
                                          kernels=KernelChoices(platform=platform))


@pytest.mark.parametrize("platform,backend", [("cpu", "xla"), ("gpu", "cudnn"), ("tpu", "flash")])
def test_auto_picks_the_platforms_kernel(platform, backend):
    """model.attention='auto' is cuDNN on a GPU, the Pallas kernel on a TPU, XLA (with the CPU
    kernels) on a CPU; 'xla' is XLA everywhere."""
    assert attention.resolve_backend("auto", platform) == backend
    assert attention.resolve_backend("xla", platform) == attention.resolve_backend(None, platform) == "xla"


def test_cpu_kernels_follow_the_compiled_platform_not_the_machine():
    """The CPU kernels are picked for steps compiled for a CPU only: with platform 'gpu' (on this
    CPU machine) the plain causal call with 'xla' is one dense XLA call, not the query blocks."""
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 256, 2, 8))

    def lowered(platform):
        kernels = KernelChoices(platform=platform)
        return jax.jit(lambda q: attention.multihead_attention(q, q, q, kernels=kernels)).lower(q).as_text()
    assert lowered("cpu").count("dot_general") > lowered("gpu").count("dot_general") == 2
