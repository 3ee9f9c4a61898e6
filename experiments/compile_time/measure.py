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
    p.add_argument("--optimizer", choices=["configured", "zero"], default="configured",
                   help="zero: optax.set_to_zero in place of the run's optimizer (what the "
                        "optimizer's per-leaf update costs the compile)")
    args = p.parse_args(argv)
    from reflex_jax.run_config import load_config
    from reflex_jax.train import program as program_module
    from reflex_jax.train.program import TrainProgram
    if args.optimizer == "zero":
        import optax
        configured = program_module.make_optimizer
        program_module.make_optimizer = lambda *a: (optax.set_to_zero(), configured(*a)[1])
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
    out = {"target": args.target, "set": dict(overrides), "kernel_off": args.kernel_off,
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


if __name__ == "__main__":
    main()
