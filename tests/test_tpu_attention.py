"""The accelerator attention backends (kernels/tpu_attention.py, the dispatch in kernels/attention.py):
the Pallas TPU kernel in interpret mode against XLA on this CPU, and steps compiled deviceless for a
TPU (v5p:2x2x1) and a GPU (8 x H100) target, checked for the kernel's custom call in the HLO."""
import dataclasses
import logging
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from reflex_jax import hardware, sharding
from reflex_jax.kernels import KernelChoices, attention
from reflex_jax.model import Decoder, ModelConfig, abstract_params, kv

from marks import needs_cuda, needs_libtpu  # skips, naming the plugin

hardware.quiet_environment()  # before any test here starts libtpu (conftest already chose cpu)

INTERPRET = KernelChoices(platform="tpu", pallas_interpret=True)


def _layer_inputs(cfg, layer, B, T, seed=0):
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 4 * cfg.n_layer))
    caches = tuple(tuple(jax.random.normal(next(keys), (B, T, p.n_self, cfg.head_dim))
                         for _ in range(2)) for p in cfg.layers)
    q = jax.random.normal(next(keys), (B, T, cfg.n_head, cfg.head_dim))
    return q, caches[layer], caches[:layer]


@pytest.mark.parametrize("n_embd,n_head,T", [(256, 4, 256), (576, 3, 128)])
@pytest.mark.slow
def test_pallas_kernel_equals_xla_on_a_reflex_layer(n_embd, n_head, T):
    """The Pallas TPU kernel (interpret mode), fed the [own ++ borrowed] K/V of a reflex layer with
    cross heads: output and the gradients of q, the layer's own K/V and the borrowed earlier K/V
    equal XLA's causal attention, for head size 64 and 192 (not a multiple of 128: not padded)."""
    cfg = ModelConfig(n_layer=3, n_head=n_head, n_embd=n_embd, vocab_size=16, block_size=T,
                      head_plan="all")
    layer = 2
    plan = cfg.layers[layer]
    assert plan.cross and cfg.head_dim in (64, 192)
    q, own, earlier = _layer_inputs(cfg, layer, 2, T)
    w = jax.random.normal(jax.random.PRNGKey(9), q.shape)

    def loss(attend):
        return lambda q, own, earlier: jnp.sum(attend(q, own, earlier) * w)
    pallas = loss(lambda q, own, earlier: kv.reflex_attention(
        q, own, earlier, plan, implementation="flash", kernels=INTERPRET))
    xla = loss(lambda q, own, earlier: jax.nn.dot_product_attention(
        q, *kv.gather_kv(own, earlier, plan), is_causal=True))
    assert "pallas_call" in str(jax.make_jaxpr(pallas)(q, own, earlier))
    got, want = (jax.jit(jax.value_and_grad(f, (0, 1, 2)))(q, own, earlier) for f in (pallas, xla))
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(got[1]), jax.tree_util.tree_leaves(want[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)


def test_pallas_kernel_leaves_masked_and_unaligned_calls_to_xla():
    """Cached decoding, padded prompts, a length that is not a multiple of 128 and a call shorter
    than one block (model init) run on XLA (no Pallas call), the padded prompt with the values of
    one masked XLA call; 'flash' asked for explicitly refuses the unaligned length in one sentence."""
    q = jax.random.normal(jax.random.PRNGKey(0), (1, 192, 2, 64))
    key_mask = jnp.arange(192)[None] >= 5

    def flash(q, k, v, implementation="flash", **kw):
        return attention.multihead_attention(q, k, v, implementation=implementation,
                                             kernels=INTERPRET, **kw)
    calls = {"decode": lambda q: flash(q[:, :1], q, q, offset=jnp.int32(7)),
             "padded prompt": lambda q: flash(q, q, q, key_mask_BS=key_mask),
             "unaligned": lambda q: flash(q, q, q, implementation="auto"),
             "init": lambda q: flash(q[:, :8], q[:, :8], q[:, :8])}
    for name, fn in calls.items():
        assert "pallas_call" not in str(jax.make_jaxpr(fn)(q)), name
    want = jax.nn.dot_product_attention(q, q, q, mask=attention.attention_mask(192, 192, 0, key_mask))
    np.testing.assert_allclose(np.asarray(calls["padded prompt"](q))[:, 5:], np.asarray(want)[:, 5:],
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"model.attention='flash' cannot take this attention call "
                                         r"\(sequence length 192 is not a multiple of 128\)"):
        flash(q, q, q)


SHARDED_WORKER = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from reflex_jax import sharding
    from reflex_jax.kernels import KernelChoices, attention
    mesh = sharding.make_mesh(2, 1, 2)  # 4 CPU devices: data 2, tensor 2
    given = KernelChoices(platform="tpu", mesh=mesh, pallas_interpret=True)
    from_context = KernelChoices(platform="tpu", pallas_interpret=True)  # under jax.set_mesh
    # batch and heads split; neither divides, so both replicated; the mesh of jax.set_mesh
    for B, H, kernels in ((2, 4, given), (1, 3, given), (2, 4, from_context)):
        q, k, v, w = (jax.random.normal(jax.random.PRNGKey(i), (B, 128, H, 64)) for i in range(4))
        def loss(fn):
            return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), (0, 1, 2)))
        pallas = loss(lambda q, k, v: attention.multihead_attention(
            q, k, v, implementation="flash", kernels=kernels))
        with jax.set_mesh(mesh):
            got = pallas(q, k, v)
            assert "shard_map" in str(pallas.trace(q, k, v).jaxpr)
        want = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True))(q, k, v)
        for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    print("ok")
""")


@pytest.mark.slow
def test_pallas_kernel_under_shard_map_equals_xla():
    """On a 2 x 2 mesh (4 CPU devices, in a subprocess) the kernel runs under shard_map with batch
    and heads split, or replicated where the mesh does not divide them (batch 1, 3 heads), with
    the mesh from KernelChoices or from `jax.set_mesh`: values and gradients equal XLA's."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", SHARDED_WORKER], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def _compiled_train_hlo(cfg, mesh, *, remat=False, key_mask=False, documents=False):
    """HLO text of a jitted forward + backward of a small Decoder, batch split over the mesh
    (with `documents`, rows packed from documents: segment ids and positions as inputs)."""
    model = Decoder(cfg, remat=remat, kernels=KernelChoices(mesh=mesh))
    replicated = NamedSharding(mesh, P())
    shapes = abstract_params(dataclasses.replace(cfg, attention="xla"))  # the same params, any backend
    params = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                                    shapes)
    batch = sharding.batch_sharding(mesh)
    B, T = 8, cfg.block_size
    mask = (jnp.arange(T)[None] >= jnp.arange(B)[:, None]) if key_mask else None

    def loss(params, tokens_BT, segment_ids_BT, positions_BT):
        logits = model.apply({"params": params}, tokens_BT, key_mask_BS=mask,
                             segment_ids_BT=segment_ids_BT, positions_BT=positions_BT)
        return jnp.mean(logits.astype(jnp.float32))
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=batch)
    doc = tokens if documents else None
    return jax.jit(jax.value_and_grad(loss)).lower(params, tokens, doc, doc).compile().as_text()


@needs_libtpu
def test_decoder_compiles_the_pallas_kernel_for_a_tpu_target():
    """A Decoder train step compiled deviceless for v5p:2x2x1 (data 2 x tensor 2) with the default
    attention='auto' runs each layer's causal attention as Mosaic kernels (forward, dq, dkv per
    layer, unrolled; the forward again under remat; once for the layers of a diagonal loop);
    with 'xla' or a key mask there are none."""
    mesh = sharding.make_mesh(2, 1, 2, devices=hardware.resolve_target("v5p:2x2x1").devices)
    looped = ModelConfig(n_layer=3, n_head=4, n_embd=256, vocab_size=64, block_size=256,
                         head_plan="all", dtype="bfloat16")
    assert looped.attention == "auto" and KernelChoices(mesh=mesh).resolved_platform() == "tpu"
    mosaic = 'custom_call_target="tpu_custom_call"'
    assert _compiled_train_hlo(looped, mesh).count(mosaic) == 3  # one layer's, in the loop's body
    cfg = dataclasses.replace(looped, scan_layers="off")
    assert _compiled_train_hlo(cfg, mesh).count(mosaic) == 3 * cfg.n_layer
    assert _compiled_train_hlo(cfg, mesh, remat=True).count(mosaic) == 4 * cfg.n_layer
    assert mosaic not in _compiled_train_hlo(cfg, mesh, key_mask=True)
    # packed documents: the same kernels, with splash's segment ids
    assert _compiled_train_hlo(cfg, mesh, documents=True).count(mosaic) == 3 * cfg.n_layer
    xla = ModelConfig(**dict(cfg.to_dict(), attention="xla"))
    assert mosaic not in _compiled_train_hlo(xla, mesh)


@needs_cuda
def test_decoder_compiles_cudnn_attention_for_a_gpu_target(caplog):
    """For 8 x H100 (deviceless), attention='cudnn' and 'auto' compile the causal attention of a
    bfloat16 Decoder to cuDNN's fused kernel; in float32 (which cuDNN does not take) 'cudnn'
    refuses in one sentence and 'auto' logs the reason and uses XLA."""
    mesh = sharding.make_mesh(8, 1, 1, devices=hardware.resolve_target("gpu:h100x8").devices)
    assert KernelChoices(mesh=mesh).resolved_platform() == "gpu"
    base = dict(n_layer=2, n_head=4, n_embd=256, vocab_size=64, block_size=128, head_plan="all")
    for name in ("cudnn", "auto"):
        hlo = _compiled_train_hlo(ModelConfig(**base, dtype="bfloat16", attention=name), mesh)
        assert "__cudnn$fmha" in hlo, name
    # packed documents: JAX's cuDNN call takes the document mask as a bias of its fused kernel
    hlo = _compiled_train_hlo(ModelConfig(**base, dtype="bfloat16", attention="cudnn"), mesh,
                              documents=True)
    assert hlo.count("__cudnn$fmhaScaleBiasSoftmax") == 2 * base["n_layer"]  # forward, backward
    with pytest.raises(ValueError, match=r"model.attention='cudnn' cannot take this attention call "
                                         r"\(.*float32.*\); use --config.model.attention=auto"):
        _compiled_train_hlo(ModelConfig(**base, attention="cudnn"), mesh)
    with caplog.at_level(logging.WARNING, logger="reflex_jax.kernels.attention"):
        attention._warn_once.cache_clear()
        hlo = _compiled_train_hlo(ModelConfig(**base, attention="auto"), mesh)
    assert "__cudnn$fmha" not in hlo
    assert "the cudnn kernel cannot take this call" in caplog.text and "float32" in caplog.text
