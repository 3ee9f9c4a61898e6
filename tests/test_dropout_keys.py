"""The train step's dropout keys (`rng_impl`): threefry draws the masks that raw PRNGKey keys drew
before typed keys (a run resumed across that change repeats its masks); the TPU's hardware
generators (rbg, unsafe_rbg) draw other masks, repeatably, and the scanned layers draw the
unrolled layers' masks under them too; a misspelt name is one sentence."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from reflex_jax.errors import TrainingError
from reflex_jax.model import Decoder, ModelConfig
from reflex_jax.train.step import StepSettings, init_state, loss_sum, loss_weights, train_step

CFG = ModelConfig(n_layer=4, n_head=4, n_embd=32, vocab_size=67, block_size=16, dropout=0.3,
                  head_plan="all", reflex_window=2)


def _batch(seed=0):
    tokens = np.random.default_rng(seed).integers(0, 67, (2, 17))
    return {"tokens": jnp.asarray(tokens, jnp.int32), "mask": jnp.ones((2, 17), jnp.float32)}


def _first_loss(cfg=CFG, **settings):
    """The loss train_step reports for its first step (dropout on)."""
    s = StepSettings(Decoder(cfg), "all", **settings)
    tx = optax.sgd(0.1)
    state = init_state(s.model, tx, jax.random.PRNGKey(0))
    step = jax.jit(lambda st, b: train_step(s, tx, lambda i: 0.1, st, b))
    return float(step(state, _batch())[1]["loss"]), s, state


def test_threefry_draws_the_masks_of_raw_keys():
    got, s, state = _first_loss(seed=5)
    batch = _batch()
    weights = loss_weights(batch["mask"], "all")
    raw = jax.random.fold_in(jax.random.PRNGKey(5), 0)  # the step's key before typed keys
    want = jax.jit(lambda p: loss_sum(s, p, batch, weights, raw, False) / jnp.sum(weights))(
        state.params)
    np.testing.assert_allclose(got, float(want), rtol=1e-6)
    other_seed = _first_loss(seed=6)[0]
    assert abs(other_seed - got) > 1e-3  # the masks move the loss far beyond rounding


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_hardware_generators_draw_other_masks_repeatably_scanned_or_not(impl):
    threefry = _first_loss(seed=5)[0]
    got = _first_loss(seed=5, rng_impl=impl)[0]
    assert got == _first_loss(seed=5, rng_impl=impl)[0]
    assert abs(got - threefry) > 1e-3
    # the scanned layers (2, 3) are handed the keys flax derives for the unrolled ones
    scanned = _first_loss(dataclasses.replace(CFG, scan_layers="on"), seed=5, rng_impl=impl)[0]
    np.testing.assert_allclose(scanned, got, rtol=1e-5)


def test_an_unknown_generator_is_one_sentence():
    from reflex_jax.run_config import load_config
    from reflex_jax.train.checks import check_run_config
    import os
    c = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                 "configs", "tiny.py"), [("rng_impl", "philox")])
    with pytest.raises(TrainingError, match=r"rng_impl='philox' is not a key implementation; set "
                                            r"--config.rng_impl to one of threefry2x32, rbg, "
                                            r"unsafe_rbg\."):
        check_run_config(c)
