"""Rematerialisation policies (reflex_jax/model/remat.py): each gives the loss and gradients of no
remat, and a deviceless TPU compile shows the memory ordering they promise."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from reflex_jax import ConfigError, hardware
from reflex_jax.model import Decoder, ModelConfig, init_params
from reflex_jax.model.remat import REMAT_POLICIES, remat_policy
from marks import needs_libtpu


def test_true_false_and_names_map_to_policies_and_a_typo_is_one_sentence():
    assert [remat_policy(v) for v in (True, False, "True", "false", "dots_saveable")] == [
        "block", "none", "block", "none", "dots_saveable"]
    with pytest.raises(ConfigError, match=r"remat=.dots. is unknown; use one of none \| block \| "
                                          r"nothing_saveable \| dots_saveable \| offload"):
        remat_policy("dots")


@pytest.mark.parametrize("policy", ["block", "nothing_saveable", "dots_saveable"])
def test_every_policy_gives_the_loss_and_gradients_of_no_remat(policy):
    cfg = ModelConfig(n_layer=3, n_head=4, n_embd=32, vocab_size=67, block_size=64, head_plan="all",
                      dropout=0.1)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 67, (2, 64)), jnp.int32)

    def loss(p, remat):
        logits = Decoder(cfg, remat=remat).apply({"params": p}, tokens, deterministic=False,
                                                 rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(
            logits, tokens[..., None], -1)[..., 0])
    want = jax.jit(jax.value_and_grad(lambda p: loss(p, "none")))(params)
    got = jax.jit(jax.value_and_grad(lambda p: loss(p, policy)))(params)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_offload_on_a_cpu_is_one_sentence():
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=32, block_size=8)
    with pytest.raises(ConfigError, match=r"remat='offload' moves kept activations .* compiled for "
                                          r"a CPU; use dots_saveable or block here"):
        Decoder(cfg, remat="offload").init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))


@needs_libtpu
def test_policies_order_the_compiled_memory_on_a_tpu():
    """The train step compiled deviceless for v5p:2x2x1: temporaries of nothing_saveable <=
    dots_saveable <= none, and offload compiles there (host offload is a TPU/GPU feature)."""
    from reflex_jax.run_config import base_config
    from reflex_jax.train.program import TrainProgram
    target = hardware.resolve_target("v5p:2x2x1")
    temp = {}
    for policy in REMAT_POLICIES:
        c = base_config()
        c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size = 4, 4, 256, 512
        c.model.vocab_size, c.model.dtype = 1024, "bfloat16"
        c.batch_size, c.mesh.data, c.mesh.fsdp, c.remat = 16, 1, 4, policy
        program = TrainProgram(c, devices=target.devices)
        compiled = program.train_step.lower(
            program.abstract_state, program.abstract_batch(16, program.batch_keys)).compile()
        temp[policy] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["nothing_saveable"] == temp["block"], temp
    assert temp["nothing_saveable"] <= temp["dots_saveable"] <= temp["none"], temp
    assert temp["nothing_saveable"] < temp["none"], temp
