"""The train step's memory and roofline per remat policy, from deviceless compiles.

    python -m reflex_lab.remat_table --targets v5e:2x4 v5p:2x2x1 gpu:h100x8 \\
        --policies none block dots_saveable offload --out remat_reference.json

For each target and policy the config (default configs/reflex.py, the reference run) gets
`remat=<policy>` and fsdp over all the target's chips, and its train step, the largest of the
dry run's programs, is compiled for the target's deviceless devices by
reflex_jax.train.dry_run.report (memory per chip, the compiler's cost, the roofline). Only the
train step depends on the policy, so the other programs are not compiled. The JSON is rewritten
after every compile and a point already in it is not compiled again, so a stopped run resumes.
`nothing_saveable` compiles to the same program as `block` (reflex_jax/model/remat.py).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
from typing import Optional, Sequence

from reflex_jax.cli import exit_on_user_error
from reflex_jax.errors import UsageError

PROG = "reflex_lab.remat_table"


def parse_args(argv: Optional[Sequence[str]]):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", required=True, help="compile targets, e.g. v5e:2x4")
    p.add_argument("--policies", nargs="+", default=["none", "block", "dots_saveable", "offload"],
                   help="remat policies (reflex_jax/model/remat.py)")
    p.add_argument("--config", default="configs/reflex.py", help="config file (default "
                   "configs/reflex.py, the reference run)")
    p.add_argument("--out", required=True, help="JSON file, rewritten after every compile")
    return p.parse_known_args(argv)


def point(config, target, policy: str) -> dict:
    """One (target, policy) point: the train step's memory, cost and roofline."""
    from reflex_jax.run_config import apply_override
    from reflex_jax.train.dry_run import report
    from reflex_jax.train.program import TrainProgram
    c = copy.deepcopy(config)
    apply_override(c, "remat", policy)  # the field takes a bool or a policy name
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, target.n_devices, 1
    t0 = time.perf_counter()
    rep = report(TrainProgram(c, devices=target.devices), target, names=("train_step",))
    step = rep["functions"]["train_step"]
    keep = ("per_device_bytes", "peak_total_bytes", "fits", "hbm_bytes", "flops_per_step",
            "bytes_per_step", "cost_source", "model_flops_per_step", "roofline_step_s",
            "roofline_mfu")
    rec = {"target": target.name, "policy": policy, **{k: rep.get(k) for k in keep},
           "compile_s": step["compile_s"], "wall_s": time.perf_counter() - t0}
    if "out_of_memory" in step:
        rec["out_of_memory"] = step["out_of_memory"]
    return rec


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, rest = parse_args(argv)
    from reflex_jax.hardware import quiet_environment
    quiet_environment()  # before JAX starts its backends
    with exit_on_user_error(PROG):
        from reflex_jax.hardware import resolve_target
        from reflex_jax.model.remat import remat_policy
        from reflex_jax.run_config import apply_override, load_config, split_overrides
        policies = [remat_policy(p) for p in args.policies]
        targets = [resolve_target(t) for t in args.targets]
        config = load_config(args.config)
        for key, raw in split_overrides(rest):
            if key in ("remat", "mesh.data", "mesh.fsdp", "mesh.tensor"):
                raise UsageError(f"--config.{key} is what the table sets; use --policies "
                                 "(the mesh is fsdp over every chip of the target).")
            apply_override(config, key, raw)
        return run(args, config, targets, policies, rest)


def run(args, config, targets, policies, overrides: Sequence[str]) -> int:
    from reflex_lab.fit import write_doc
    from reflex_lab.machine import cpu_count, cpu_model
    doc = {"config": args.config, "overrides": list(overrides), "points": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            doc = json.load(f)
    done = {(p["target"], p["policy"]) for p in doc["points"]}
    for target in targets:
        for policy in policies:
            if (target.name, policy) in done:
                continue
            print(f"{target.name}, remat={policy}: compiling the train step", flush=True)
            rec = point(config, target, policy)
            rec.update(date=datetime.datetime.now().isoformat(timespec="seconds"),
                       cpu=cpu_model(), cores=cpu_count())
            doc["points"].append(rec)
            write_doc(args.out, doc)
            total = rec["peak_total_bytes"] / 2**30
            print(f"  {total:.2f} GiB per chip (temporaries "
                  f"{(rec['per_device_bytes'].get('temp') or 0) / 2**30:.2f}), "
                  f"fits: {rec['fits']}, roofline step >= "
                  f"{(rec['roofline_step_s'] or 0) * 1e3:.1f} ms; compiled in "
                  f"{rec['compile_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
