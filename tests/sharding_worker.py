"""Runs in a subprocess with 8 fake CPU devices (the flag must be set before jax is imported, and the
pytest process already imported jax with one). Writes its measurements as JSON; test_sharding.py
asserts on them.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py OUT.json TMPDIR
"""
import json
import os
import sys

import jax
import numpy as np

from reflex_jax import checkpoint as ckpt
from reflex_jax import sharding
from reflex_jax.train.trainer import Trainer
from test_trainer import small_config  # this script's folder is on sys.path

MESHES = [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)]
STEPS = 2
# 8 heads, reflex `all`: self heads 8, 7, 6 -> layer 1's K/V heads never divide tensor=2 or 8,
# layer 2's divide 2 but not 8. Vocab 259 is odd, so the vocab axis never splits.
MODEL = {"model.n_layer": 3, "model.n_head": 8, "model.n_embd": 64, "model.block_size": 32,
         "model.head_plan": "all"}


def config(run_dir, data_dir, mesh):
    kw = dict(MODEL, max_steps=10)
    kw.update({"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2]})
    if data_dir:  # reuse the prepared task data instead of preparing it once per mesh
        kw.update({"data.dir": data_dir, "data.task": ""})
    c = small_config(run_dir, **kw)
    c.optim.warmup_steps = 0  # lr(0) > 0: the first step must move the params
    return c


def _with(c, **kw):
    for k, v in kw.items():
        c[k] = v
    return c


def run_steps(trainer, params=None):
    """STEPS train steps from `params` (host arrays) or from a fresh, directly sharded init.
    Returns (init params, params after each step, losses), all on the host."""
    state = trainer.program.init_state(params)
    init = jax.device_get(state.params)
    after, losses = [], []
    for step in range(STEPS):
        batch = trainer.program.put_batch(trainer.train_loader.batch(step))
        state, m = trainer.program.train_step(state, batch)
        losses.append(float(m["loss"]))
        after.append(jax.device_get(state.params))
    return state, init, after, losses


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def frac_over(a, b, tol=1e-6):
    """Fraction of all elements whose difference exceeds tol."""
    over = sum(int(np.sum(np.abs(np.asarray(x) - np.asarray(y)) > tol))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
    return over / sum(np.size(x) for x in jax.tree_util.tree_leaves(a))


def describe(tree):
    """{param path: [spec, shard shape on device 0]} for every array leaf."""
    return {jax.tree_util.keystr(p): [sharding.format_spec(x.sharding.spec, x.ndim),
                                      list(x.addressable_shards[0].data.shape)]
            for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def main(out_path, tmp):
    assert jax.device_count() == 8, jax.devices()
    log = lambda s: None  # noqa: E731
    ref_trainer = Trainer(config(os.path.join(tmp, "ref"), "", (1, 1, 1)), log=log,
                          devices=jax.devices()[:1])
    data_dir = ref_trainer.data_dir
    ref_state, ref_init, ref_after, ref_losses = run_steps(ref_trainer)
    ref_opt = jax.device_get(ref_state.opt_state)
    result = {"reference": {"losses": ref_losses, "devices": ref_trainer.program.mesh.devices.size}}

    for mesh in MESHES:
        t = Trainer(config(os.path.join(tmp, "m%d%d%d" % mesh), data_dir, mesh), log=log)
        # (2,2,2) initialises directly sharded (must equal the 1-device init); the others start
        # from the reference init, placed onto their shardings (saves one init compile each)
        fresh = mesh == (2, 2, 2)
        state, init, after, losses = run_steps(t, None if fresh else ref_init)
        result["x".join(map(str, mesh))] = {
            "mesh": dict(t.program.mesh.shape), "losses": losses, "fresh_init": fresh,
            "init_diff": max_diff(init, ref_init),
            "param_diffs": [max_diff(a, b) for a, b in zip(after, ref_after)],
            "param_frac_over_1e-6": [frac_over(a, b) for a, b in zip(after, ref_after)],
            "opt_diff": max_diff(jax.device_get(state.opt_state), ref_opt),
            "params": describe(state.params),
            "adam_mu": describe(state.opt_state[1][0].mu),
        }
        if fresh:
            saved = os.path.join(tmp, "saved")
            ck = ckpt.RunCheckpoints(saved, async_save=False)
            ck.save(STEPS, state.params, state.opt_state)
            ck.close()
            saved_params, saved_opt = after[-1], jax.device_get(state.opt_state)

    # a batch that the mesh cannot split evenly is refused with one sentence
    try:
        Trainer(_with(config(os.path.join(tmp, "bad"), data_dir, (2, 4, 1)), batch_size=12), log=log)
        result["bad_batch_error"] = None
    except Exception as e:  # noqa: BLE001 - the test asserts on type and message
        result["bad_batch_error"] = f"{type(e).__name__}: {e}"

    # orbax: saved on (2,2,2), restored onto (8,1,1) and onto one device
    targets = {"8x1x1": (config(os.path.join(tmp, "r8"), data_dir, (8, 1, 1)), None),
               "1 device": (config(os.path.join(tmp, "r1"), data_dir, (1, 1, 1)), jax.devices()[:1])}
    for name, (c, devices) in targets.items():
        t = Trainer(c, log=log, devices=devices)
        ck = ckpt.RunCheckpoints(saved, read_only=True)
        params, opt = ck.restore(STEPS, t.program.abstract_state.params, t.program.abstract_state.opt_state)
        ck.close()
        result["restore " + name] = {
            "param_diff": max_diff(jax.device_get(params), saved_params),
            "opt_diff": max_diff(jax.device_get(opt), saved_opt),
            "devices": sorted({len(x.sharding.device_set) for x in jax.tree_util.tree_leaves(params)}),
            "matches_target_shardings": all(
                x.sharding == s for x, s in zip(jax.tree_util.tree_leaves(params),
                                                jax.tree_util.tree_leaves(t.program.param_shardings))),
            "params": describe(params),
        }
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
