"""Scanned layers (reflex_jax/model/scan.py): the runs and diagonal loops each plan scans, and
scanned against unrolled (`scan_layers` on / off) giving the same logits, parameter gradients and
cached decoding, with packed documents, value residual, dropout and remat; deviceless, a scanned
24-layer train step compiles to loops."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reflex_jax import ConfigError
from reflex_jax.model import Decoder, ModelConfig, init_cache, init_params
from reflex_jax.model.decoder import abstract_params, param_logical_axes
from reflex_jax.model.scan import (diagonal_runs, scan_runs, scanned_layers, uses_diagonal,
                                   uses_scan)

from marks import fast_only, needs_libtpu, slow
from tolerance import order_atol

PLANS = {  # name -> (ModelConfig fields, the runs: (first layer, period, repeats))
    "none": ({"head_plan": "none"}, [(0, 1, 6)]),
    "gqa:2": ({"head_plan": "gqa:2"}, [(0, 1, 6)]),
    "all_w2": ({"head_plan": "all", "reflex_window": 2}, [(2, 1, 4)]),
    "recent:2,1": ({"head_plan": "recent:2,1", "n_head": 8, "n_embd": 64}, [(2, 1, 4)]),
    "cla:2": ({"head_plan": "cla:2"}, [(0, 2, 3)]),
    "value_residual": ({"head_plan": "none", "value_residual": True}, [(1, 1, 5)]),
    "all_w2_value_residual": ({"head_plan": "all", "reflex_window": 2, "value_residual": True},
                              [(2, 1, 4)]),
    "sharev:recent:1": ({"head_plan": "sharev:recent:1"}, [(1, 1, 5)]),
}

# the layers outside those runs that one diagonal loop covers (model/scan.py's Diagonal)
DIAGONALS = {"all_w2": [(0, 2)], "recent:2,1": [(0, 2)]}
ALL8 = {"head_plan": "all", "n_head": 8, "n_embd": 64}  # `all` without a window: no run


def _cfg(fields, **over):
    base = dict(n_layer=6, n_head=4, n_embd=32, vocab_size=67, block_size=16)
    return ModelConfig(**{**base, **fields, **over})


def _tokens(B=2, T=16, vocab=67, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, T)), jnp.int32)


def _loss(cfg, params, tokens, remat="none", **kw):
    logits = Decoder(cfg, remat=remat).apply({"params": params}, tokens, **kw)
    loss = jnp.mean(jax.nn.logsumexp(logits, -1)
                    - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])
    return loss, logits


def _compare(cfg, tokens, remat="none", depth=None, **kw):
    """Loss, logits and every parameter gradient of scan_layers=on against off."""
    params = init_params(cfg, jax.random.PRNGKey(0))
    off = dataclasses.replace(cfg, scan_layers="off")
    f = lambda c: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p: _loss(c, p, tokens, remat, **kw), has_aux=True))(params)
    (loss_on, logits_on), grads_on = f(dataclasses.replace(cfg, scan_layers="on"))
    (loss_off, logits_off), grads_off = f(off)
    depth = depth or cfg.n_layer
    np.testing.assert_allclose(np.asarray(logits_on), np.asarray(logits_off), rtol=0,
                               atol=order_atol(logits_off, depth))
    np.testing.assert_allclose(float(loss_on), float(loss_off), rtol=0,
                               atol=order_atol(loss_off, depth))
    flat_on = jax.tree_util.tree_leaves_with_path(grads_on)
    flat_off = dict(jax.tree_util.tree_leaves_with_path(grads_off))
    assert len(flat_on) == len(flat_off)
    # rounding noise scales with the largest gradient (some, like K's bias, are zero but for it)
    atol = order_atol(np.concatenate([np.ravel(g) for g in flat_off.values()]), depth)
    for path, g in flat_on:
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_off[path]), rtol=0, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", list(PLANS))
def test_each_plan_scans_its_repeating_runs(name):
    fields, runs = PLANS[name]
    cfg = _cfg(fields)
    assert [(r.start, r.period, r.repeats) for r in scan_runs(cfg)] == runs
    diagonals = DIAGONALS.get(name, [])
    assert [(d.start, d.stop) for d in diagonal_runs(cfg)] == diagonals
    assert scanned_layers(cfg) == sum(p * n for _, p, n in runs) + sum(b - a for a, b in diagonals)


def test_reference_width_all_with_a_window_scans_past_the_window():
    cfg = ModelConfig(n_layer=24, n_head=8, n_embd=1536, head_plan="all", reflex_window=7)
    (run,) = scan_runs(cfg)
    assert (run.start, run.period, run.repeats, run.window) == (7, 1, 17, (1,) * 7)
    # a routed plan reads mixtures of sources, not relative ones: nothing scans
    assert scan_runs(dataclasses.replace(cfg, head_plan="route", n_layer=6, reflex_window=None)) == ()


@pytest.mark.parametrize("name", fast_only(list(PLANS), "all_w2"))
def test_scanned_gives_the_logits_and_gradients_of_unrolled(name):
    _compare(_cfg(PLANS[name][0]), _tokens())


def test_the_first_layers_of_all_are_one_diagonal_loop():
    """Layer l of `all` has 8 - l self heads, and its cross head h reads head h of layer 7 - h:
    the K/V head h that an earlier layer computed last, which one carried K/V holds."""
    cfg = ModelConfig(n_layer=24, n_head=8, n_embd=1536, head_plan="all", reflex_window=7)
    (d,) = diagonal_runs(cfg)
    assert (d.start, d.stop, d.n_self, d.init) == (0, 7, (8, 7, 6, 5, 4, 3, 2), (None,) * 8)
    assert scanned_layers(cfg) == 24
    six = _cfg(ALL8)
    assert scan_runs(six) == () and [(d.start, d.stop) for d in diagonal_runs(six)] == [(0, 6)]
    # the layers' K/V heads are not each read at its own index: no diagonal
    for plan in ("route", "sharev:all", "gqa:2"):
        assert diagonal_runs(_cfg(ALL8, head_plan=plan)) == (), plan
    assert diagonal_runs(_cfg(ALL8, value_residual=True)) == ()

    def scans(setting):  # the lengths of the decoder's top-level loops
        c = dataclasses.replace(six, scan_layers=setting)
        params = init_params(c, jax.random.PRNGKey(0))
        jaxpr = jax.make_jaxpr(lambda p: Decoder(c).apply({"params": p}, _tokens()))(params)
        return [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert scans("on") == [6] and scans("off") == []


def test_a_diagonal_loop_gives_the_logits_and_gradients_of_unrolled(monkeypatch):
    _compare(_cfg(ALL8), _tokens())
    # a loop that starts after an unrolled layer: its carry's first K/V come from that layer
    from reflex_jax.model import decoder
    from reflex_jax.model.scan import Diagonal
    late = Diagonal(1, 6, (7, 6, 5, 4, 3), (None,) * 7 + ((0, 7),))
    monkeypatch.setattr(decoder, "diagonal_runs", lambda cfg: (late,))
    _compare(_cfg(ALL8), _tokens())


@slow
def test_a_diagonal_loop_with_dropout_documents_rope_and_remat():
    _compare(_cfg(ALL8, dropout=0.3, pos_emb="rope"), _tokens(), remat="block",
             deterministic=False, rngs={"dropout": jax.random.PRNGKey(5)})
    segments = jnp.asarray(np.repeat([[0] * 5 + [1] * 7 + [2] * 4], 2, 0), jnp.int32)
    _compare(_cfg(ALL8, reflex_window=3), _tokens(), remat="dots_saveable",
             segment_ids_BT=segments)


@slow
def test_packed_documents_scan():
    tokens = _tokens()
    segments = jnp.asarray(np.repeat([[0] * 5 + [1] * 7 + [2] * 4], 2, 0), jnp.int32)
    starts = np.array([0, 5, 12])
    positions = jnp.asarray(np.arange(16) - starts[np.asarray(segments[0])])[None].repeat(2, 0)
    _compare(_cfg(PLANS["all_w2"][0]), tokens, segment_ids_BT=segments, positions_BT=positions)
    _compare(_cfg(PLANS["cla:2"][0], pos_emb="rope"), tokens, segment_ids_BT=segments,
             positions_BT=positions)


@slow
@pytest.mark.parametrize("remat", ["block", "dots_saveable"])
def test_remat_policies_apply_inside_the_scan(remat):
    _compare(_cfg(PLANS["recent:2,1"][0]), _tokens(), remat=remat)


@slow
def test_dropout_draws_the_masks_of_unrolled():
    cfg = _cfg(PLANS["all_w2"][0], dropout=0.3)
    _compare(cfg, _tokens(), remat="block", deterministic=False,
             rngs={"dropout": jax.random.PRNGKey(3)})
    _compare(_cfg(PLANS["cla:2"][0], dropout=0.3), _tokens(), deterministic=False,
             rngs={"dropout": jax.random.PRNGKey(4)})


@slow
@pytest.mark.parametrize("name", ["all_w2_value_residual", "cla:2", "recent:2,1"])
def test_cached_decoding_scanned_equals_unrolled(name):
    cfg = _cfg(PLANS[name][0])
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = _tokens(T=12)

    def decode(setting):
        c = dataclasses.replace(cfg, scan_layers=setting)
        model, cache = Decoder(c), init_cache(c, 2, 16)
        logits, cache = model.apply({"params": params}, tokens[:, :8], cache=cache, cache_index=0)
        outs = [logits]
        for i in range(8, 12):
            step, cache = model.apply({"params": params}, tokens[:, i:i + 1], cache=cache,
                                      cache_index=i)
            outs.append(step)
        return jnp.concatenate(outs, 1), cache
    got, got_cache = decode("on")
    want, want_cache = decode("off")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                               atol=order_atol(want, cfg.n_layer))
    for a, b in zip(jax.tree_util.tree_leaves(got_cache), jax.tree_util.tree_leaves(want_cache)):
        assert a.shape == b.shape
        if b.size:  # a borrowing layer caches no heads
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                       atol=order_atol(b, cfg.n_layer))
    auto, _ = decode("auto")  # on a CPU: all unrolled
    np.testing.assert_allclose(np.asarray(auto), np.asarray(want), rtol=0,
                               atol=order_atol(want, cfg.n_layer))


def test_the_setting_and_the_param_tree():
    for platform in ("tpu", "gpu"):
        assert uses_scan("auto", False, 16, platform) and uses_scan("auto", True, 8, platform)
        assert not uses_scan("auto", True, 1, platform)
    assert not uses_scan("auto", False, 16, "cpu")  # unrolled runs faster on a CPU
    assert uses_scan("on", True, 1, "cpu") and not uses_scan("off", False, 16, "tpu")
    # diagonal loops: never with a cache; `auto` on TPUs only (their padded heads cost FLOPs)
    assert uses_diagonal("auto", False, "tpu") and uses_diagonal("on", False, "cpu")
    assert not any([uses_diagonal("auto", False, "gpu"), uses_diagonal("auto", False, "cpu"),
                    uses_diagonal("on", True, "tpu"), uses_diagonal("off", False, "tpu")])
    with pytest.raises(ConfigError, match=r"model.scan_layers='yes' is unknown; use one of "
                                          r"auto \| on \| off"):
        _cfg({}, scan_layers="yes")
    cfg = _cfg(PLANS["all_w2"][0])
    off = dataclasses.replace(cfg, scan_layers="off")
    assert jax.tree_util.tree_structure(abstract_params(cfg)) == jax.tree_util.tree_structure(
        abstract_params(off))
    assert param_logical_axes(cfg) == param_logical_axes(off)
    assert cfg.model_differences(off) == []  # a runtime field: a run may resume with another


def _hlo_of_train_step(n_layer, scan_layers):
    from reflex_jax import hardware
    from reflex_jax.run_config import base_config
    from reflex_jax.train.program import TrainProgram
    target = hardware.resolve_target("v5p:2x2x1")
    c = base_config()
    m = c.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = n_layer, 8, 256, 256, 1024
    m.head_plan, m.reflex_window, m.dtype, m.scan_layers = "all", 7, "bfloat16", scan_layers
    c.batch_size, c.mesh.data, c.mesh.fsdp = 8, 1, 4
    program = TrainProgram(c, devices=target.devices)
    lowered = program.train_step.lower(program.abstract_state,
                                       program.abstract_batch(8, program.batch_keys))
    return lowered


@needs_libtpu
def test_a_scanned_24_layer_step_compiles_to_a_loop_for_a_tpu():
    """`all` with reflex_window=7 over 24 layers: a diagonal loop of 7 layers and a scan of 17;
    the program holds two layers' matmuls where the unrolled one holds 24, and it compiles (the
    unrolled one is only lowered)."""
    scanned = _hlo_of_train_step(24, "auto")
    unrolled = _hlo_of_train_step(24, "off").as_text()
    text = scanned.as_text()
    assert text.count("stablehlo.while") > unrolled.count("stablehlo.while")
    dots = [t.count("stablehlo.dot_general") for t in (text, unrolled)]
    assert dots[0] < 0.25 * dots[1], dots  # 2 layers' matmuls in the program instead of 24
    compiled = scanned.compile()
    assert "while" in compiled.as_text() and compiled.memory_analysis().temp_size_in_bytes > 0
