"""The train step's compile time: `python experiments/compile_time/measure.py TARGET [--set k=v ...]`.

TARGET is a `--compile_for` target (v5p:2x2x1, v5e:2x4, ...) or `cpu` (the step jitted for this
machine). Builds the run's TrainProgram from configs/reflex.py with the overrides, lowers and
compiles only the train step, and prints one JSON line: the overrides, the lowering and compile
seconds (wall, and the CPU time of all the compiler's threads, the steadier figure on a shared
machine), the size of the lowered program and its while loops, the compiled temporaries.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from reflex_jax import hardware  # noqa: E402

hardware.quiet_environment()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("--config", default="configs/reflex.py")
    p.add_argument("--set", action="append", default=[], help="dotted.key=value override")
    p.add_argument("--kernel_off", action="append", default=[],
                   help="a KernelChoices switch to turn off (fused_loss, f32_linear)")
    p.add_argument("--dump", default="", help="write the optimized HLO text here")
    p.add_argument("--optimizer", choices=["configured", "zero", "stacked"], default="configured",
                   help="zero: optax.set_to_zero in place of the run's optimizer (what the "
                        "optimizer's per-leaf update costs the compile); stacked: the run's "
                        "optimizer on the layers' leaves stacked by parameter (its state stacked "
                        "too: an experiment, not a checkpoint layout)")
    args = p.parse_args(argv)
    from reflex_jax.run_config import load_config
    from reflex_jax.train import program as program_module
    from reflex_jax.train.program import TrainProgram
    configured = program_module.make_optimizer
    if args.optimizer == "zero":
        import optax
        program_module.make_optimizer = lambda *a: (optax.set_to_zero(), configured(*a)[1])
    elif args.optimizer == "stacked":
        def make_stacked(*a):
            tx, schedule = configured(*a)
            return _stacked(tx), schedule
        program_module.make_optimizer = make_stacked
    overrides = [tuple(s.split("=", 1)) for s in args.set]
    config = load_config(args.config, overrides)
    devices = None if args.target == "cpu" else hardware.resolve_target(args.target).devices
    t0 = time.perf_counter()
    from reflex_jax.kernels import KernelChoices
    kernels = KernelChoices(**{k: False for k in args.kernel_off})
    program = TrainProgram(config, devices=devices, kernels=kernels)
    state = program.abstract_state
    batch = program.abstract_batch(config.batch_size, program.batch_keys)
    t1 = time.perf_counter()
    lowered = program.train_step.lower(state, batch)
    t2 = time.perf_counter()
    text = lowered.as_text()
    c0 = time.process_time()
    compiled = lowered.compile()
    t3, c1 = time.perf_counter(), time.process_time()
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "load_avg_1m": round(os.getloadavg()[0], 1),
           "target": args.target, "set": dict(overrides), "kernel_off": args.kernel_off,
           "optimizer": args.optimizer,
           "build_s": round(t1 - t0, 1),
           "lower_s": round(t2 - t1, 1), "compile_s": round(t3 - t2, 1),
           "compile_cpu_s": round(c1 - c0, 1),
           "stablehlo_chars": len(text), "stablehlo_while": text.count("stablehlo.while")}
    mem = compiled.memory_analysis()
    if mem is not None:
        out["temp_gib"] = round(mem.temp_size_in_bytes / 2**30, 3)
        out["args_gib"] = round(mem.argument_size_in_bytes / 2**30, 3)
    if args.dump:
        with open(args.dump, "w") as f:
            f.write(compiled.as_text())
    print(json.dumps(out), flush=True)


def _stacked(tx):
    """`tx` applied to the params with every layer's leaves of one parameter stacked (h_0/x, h_1/x,
    ... of one shape become one array)."""
    import re

    import jax
    import jax.numpy as jnp
    import optax

    def groups(tree):
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        by = {}
        for i, (path, leaf) in enumerate(leaves):
            key = (re.sub(r"h_\d+", "h_*", jax.tree_util.keystr(path)), leaf.shape, str(leaf.dtype))
            by.setdefault(key, []).append(i)
        return list(by.values())

    def stack(tree):
        leaves = jax.tree_util.tree_leaves(tree)
        return [jnp.stack([leaves[i] for i in g]) for g in groups(tree)]

    def unstack(stacked, like):
        leaves = [None] * len(jax.tree_util.tree_leaves(like))
        for g, arr in zip(groups(like), stacked):
            for j, i in enumerate(g):
                leaves[i] = arr[j]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like), leaves)

    def update(grads, state, params=None):
        updates, state = tx.update(stack(grads), state, stack(params))
        return unstack(updates, grads), state

    return optax.GradientTransformation(lambda params: tx.init(stack(params)), update)


if __name__ == "__main__":
    main()
