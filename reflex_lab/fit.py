"""The largest model of each depth that fits a hardware target, from deviceless compiles.

    python -m reflex_lab.fit --target v5p:2x2x1 --n_layer 6 --out fit_v5p-2x2x1.json

For each depth the search walks n_embd on a grid of `--step` (heads of `--head_dim`, so n_head =
n_embd / head_dim), compiling the config's train step (default configs/reflex.py: block 2048,
bf16, reflex 'all', batch 16 x grad_accum 2) with fsdp over all the target's chips, for the
target's deviceless devices (reflex_jax.hardware). A point fits when the compiled train step's
per-device total (memory_analysis) is within the chip's HBM; a point XLA:TPU refuses to compile
does not. The train step is the largest of the dry run's functions (docs/accelerators.md shows
it for the reference config), so a probe compiles only it; the largest fitting point is then
compiled in full by reflex_jax.train.dry_run.report (train and eval steps, prefill, decode)
unless --no_confirm.

Compiles are minutes each (layers are unrolled), so the next probe is the largest grid point that
a fit of the probes so far predicts to fit (`predictor`: total ~ a * state + act * n_embd, with
the state, params + optimizer state per device, exact from shapes); a probe on the wrong side
narrows the bracket, and the search ends when a fitting point and the next grid point, which does
not fit, are both compiled. The JSON is rewritten after every probe, so a stop loses nothing.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Callable, Optional, Sequence

from reflex_jax.cli import exit_on_user_error
from reflex_jax.errors import UsageError

PROG = "reflex_lab.fit"
# activation bytes per token, layer and n_embd before any probe is compiled: the reference
# config's train step on v5p:2x2x1 (8,111.6 MiB of temporaries for 4,096 tokens per chip, 6
# layers, n_embd 1536); only the first probe's guess, replaced by a fit to the probes
FIRST_GUESS_ACT = 225.0


def parse_args(argv: Optional[Sequence[str]]):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, help="compile target: v5e:2x4, v5p:2x2x1, "
                   "v5p:2x2x2, v6e:2x4, gpu:h100x8, ... (reflex_jax/hardware.py)")
    p.add_argument("--config", default="configs/reflex.py", help="config file (default "
                   "configs/reflex.py); --config.<field>=<value> words override its fields")
    p.add_argument("--n_layer", type=int, nargs="+", default=[6], help="depths to search")
    p.add_argument("--head_dim", type=int, default=128, help="head size; n_head = n_embd / it")
    p.add_argument("--step", type=int, default=512, help="n_embd grid step (multiple of head_dim)")
    p.add_argument("--min_embd", type=int, default=512)
    p.add_argument("--max_embd", type=int, default=32768)
    p.add_argument("--start_embd", type=int, default=0,
                   help="first probe (default: the predicted largest fit, see predictor())")
    p.add_argument("--no_confirm", action="store_true",
                   help="skip the full dry run (all four functions and the roofline, "
                   "reflex_jax.train.dry_run.report) of the largest fitting point")
    p.add_argument("--out", default="", help="JSON file, rewritten after every probe")
    return p.parse_known_args(argv)


def check_args(args) -> None:
    if args.head_dim < 1 or args.step < args.head_dim or args.step % args.head_dim:
        raise UsageError(f"--step={args.step} must be a positive multiple of --head_dim="
                         f"{args.head_dim}; every grid point has whole heads.")
    if not args.step <= args.min_embd <= args.max_embd:
        raise UsageError(f"--min_embd={args.min_embd} and --max_embd={args.max_embd} must satisfy "
                         f"step <= min_embd <= max_embd; pick a range of at least one --step.")
    if any(n < 1 for n in args.n_layer):
        raise UsageError(f"--n_layer {args.n_layer} must all be positive.")


# ---- one point of the grid ----------------------------------------------------------------------

class Prober:
    """Builds the TrainProgram of one (n_layer, n_embd) point for the target and compiles it."""

    def __init__(self, base_config, target, head_dim: int, log: Callable[[str], None]):
        self.base, self.target, self.head_dim, self.log = base_config, target, head_dim, log
        self._programs: dict = {}  # (n_layer, n_embd) -> TrainProgram, see keep()
        self._state: dict = {}

    def config(self, n_layer: int, n_embd: int):
        c = self.base.copy_and_resolve_references()
        m = c.model
        m.n_layer, m.n_embd, m.n_head = n_layer, n_embd, n_embd // self.head_dim
        # 'all' borrows from every earlier layer unless windowed; each layer keeps reflex_min_self
        # self heads, so a window of n_head - reflex_min_self keeps the schedule valid
        widest = m.n_head - m.reflex_min_self
        m.reflex_window = widest if m.head_plan == "all" and n_layer - 1 > widest else None
        return c

    def program(self, n_layer: int, n_embd: int):
        """The point's TrainProgram, built from shapes."""
        key = (n_layer, n_embd)
        if key not in self._programs:
            self._programs[key] = self._build(n_layer, n_embd)
        return self._programs[key]

    def _build(self, n_layer: int, n_embd: int):
        from reflex_jax.train.program import TrainProgram
        return TrainProgram(self.config(n_layer, n_embd), devices=self.target.devices)

    def keep(self, *keys) -> None:
        """Drop every TrainProgram but those of `keys`. A kept one keeps its compiled train step
        in JAX's in-memory cache, so that the full dry run of the largest fit does not compile
        it again."""
        self._programs = {k: p for k, p in self._programs.items() if k in keys}

    def state_bytes(self, n_layer: int, n_embd: int) -> int:
        """Params + optimizer state per device, from shapes (nothing compiles)."""
        from reflex_jax.train.dry_run import per_device_bytes
        key = (n_layer, n_embd)
        if key not in self._state:
            state = (self._programs.get(key) or self._build(n_layer, n_embd)).abstract_state
            self._state[key] = (per_device_bytes(state.params)
                                + per_device_bytes(state.opt_state))
        return self._state[key]

    def probe(self, n_layer: int, n_embd: int) -> dict:
        """The train step's compiled memory at this point, and whether it fits the chip."""
        from reflex_jax.model import count_params
        from reflex_jax.train.dry_run import compile_all, per_device_bytes
        program = self.program(n_layer, n_embd)
        step = compile_all(program, names=("train_step",))["train_step"]
        state = program.abstract_state
        per_device = {"params": per_device_bytes(state.params),
                      "opt_state": per_device_bytes(state.opt_state),
                      **{k: step["memory"].get(k) for k in ("temp", "arguments", "outputs",
                                                            "total")}}
        oom = step.get("out_of_memory")
        total = (oom["needs"] + per_device["params"] + per_device["opt_state"] if oom
                 else per_device["total"])
        model = program.model_config
        rec = {"n_layer": n_layer, "n_embd": n_embd, "n_head": model.n_head,
               "reflex_window": model.reflex_window, "params": count_params(state.params),
               "per_device_bytes": per_device, "peak_total_bytes": total,
               "fits": oom is None and total <= self.target.chip.hbm_bytes,
               "compile_s": step["compile_s"], "flops": step["flops"],
               "bytes_accessed": step["bytes_accessed"]}
        if oom:
            rec["out_of_memory"] = oom
        self.log(f"  n_layer {n_layer} n_embd {n_embd} ({rec['params'] / 1e9:.2f} B params): "
                 f"{'fits' if rec['fits'] else 'does not fit'}, {_gib(total)} per device"
                 f"{' (refused by the compiler)' if oom else ''}; compiled in "
                 f"{rec['compile_s']:.0f} s")
        return rec

    def confirm(self, n_layer: int, n_embd: int) -> dict:
        """The full dry run (train and eval steps, prefill, decode) of one point."""
        from reflex_jax.train.dry_run import report
        rep = report(self.program(n_layer, n_embd), self.target)
        keep = ("fits", "peak_total_bytes", "per_device_bytes", "flops_per_step", "bytes_per_step",
                "model_flops_per_step", "roofline_step_s", "roofline_mfu", "compile_s")
        out = {k: rep.get(k) for k in keep}
        out["functions"] = {name: {"compile_s": f["compile_s"],
                                   "total": f["memory"].get("total"),
                                   "temp": f["memory"].get("temp"),
                                   **({"out_of_memory": f["out_of_memory"]}
                                      if "out_of_memory" in f else {})}
                            for name, f in rep["functions"].items()}
        self.log(f"  confirmed n_embd {n_embd}: {'fits' if out['fits'] else 'does not fit'}, "
                 f"peak {_gib(out['peak_total_bytes'])} over all functions; compiled in "
                 f"{out['compile_s']:.0f} s")
        return out


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB"


# ---- the search ---------------------------------------------------------------------------------

def predictor(probes: dict, state_at: Callable[[int], int], embd_at: Callable[[int], int],
              first_guess_act: float) -> Callable[[int], float]:
    """total(k) ~ a * state + act * n_embd: the state (params, Adam's two moments) and the float32
    gradients that mirror the params grow as n_embd^2, activations as n_embd. Fitted to the two
    probes nearest k; one probe: a = 4/3 (gradients as large as the params, a third of the
    state); none: also act = first_guess_act."""
    def fitted(k: int) -> float:
        near = sorted(probes, key=lambda j: abs(j - k))[:2]
        pts = [(state_at(j), embd_at(j), probes[j]["peak_total_bytes"]) for j in near]
        a, act = 4 / 3, first_guess_act
        if len(pts) == 2:
            (s0, d0, t0), (s1, d1, t1) = pts
            det = s0 * d1 - s1 * d0
            if det:
                a2, act2 = (t0 * d1 - t1 * d0) / det, (s0 * t1 - s1 * t0) / det
                if a2 > 0 and act2 >= 0:
                    return a2 * state_at(k) + act2 * embd_at(k)
        if pts:
            s0, d0, t0 = pts[0]
            act = max(0.0, (t0 - a * s0) / d0)
        return a * state_at(k) + act * embd_at(k)
    return fitted


def predicted_largest(predict: Callable[[int], float], hbm: int, lo: int, hi: int) -> int:
    """The largest grid index in (lo, hi) predicted to fit `hbm`, or lo + 1 when none is (that
    point then settles the bracket); the prediction grows with k, so bisect."""
    left, right = lo + 1, hi - 1
    if predict(left) > hbm:
        return left
    while left < right:
        mid = (left + right + 1) // 2
        left, right = (mid, right) if predict(mid) <= hbm else (left, mid - 1)
    return left


def search(prober: Prober, n_layer: int, args, hbm: int, save: Callable[[], None],
           record: dict) -> None:
    """Fill `record` (probes, largest_fit, smallest_no_fit) for one depth."""
    step = args.step
    k_min, k_max = -(-args.min_embd // step), args.max_embd // step
    lo, hi = k_min - 1, k_max + 1  # largest known fit, smallest known non-fit (sentinels)
    probes: dict = {}
    c = prober.base
    tokens = c.batch_size // c.grad_accum // prober.target.n_devices * c.model.block_size
    predict = predictor(probes, lambda k: prober.state_bytes(n_layer, k * step),
                        lambda k: k * step, FIRST_GUESS_ACT * tokens * n_layer)
    k = (min(max(args.start_embd // step, k_min), k_max) if args.start_embd else
         predicted_largest(predict, hbm, lo, hi))
    while True:
        probes[k] = prober.probe(n_layer, k * step)
        record["probes"].append(probes[k])
        save()
        if probes[k]["fits"]:
            lo = k
        else:
            hi = k
        prober.keep((n_layer, lo * step))
        if hi == lo + 1 and lo >= k_min and not args.no_confirm and "confirmed" not in probes[lo]:
            probes[lo]["confirmed"] = prober.confirm(n_layer, lo * step)
            save()
            if not probes[lo]["confirmed"]["fits"]:  # another function is the larger one
                probes[lo]["fits"], hi = False, lo
                lo = max((j for j in probes if probes[j]["fits"]), default=k_min - 1)
        if hi == lo + 1:
            break
        k = predicted_largest(predict, hbm, lo, hi)
    record["largest_fit"] = probes.get(lo)
    record["smallest_no_fit"] = probes.get(hi)
    if lo < k_min:
        record["note"] = f"nothing from n_embd {k_min * step} up fits"
    if hi > k_max:
        record["note"] = f"everything up to n_embd {k_max * step} fits"
    save()


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, rest = parse_args(argv)
    from reflex_jax.hardware import quiet_environment
    quiet_environment()  # before JAX starts its backends
    with exit_on_user_error(PROG):
        check_args(args)
        from reflex_jax.run_config import apply_override, load_config, split_overrides
        from reflex_jax.hardware import resolve_target
        overrides = split_overrides(rest)
        target = resolve_target(args.target)
        config = load_config(args.config)
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, target.n_devices, 1
        for key, raw in overrides:
            if key in ("model.n_layer", "model.n_embd", "model.n_head", "model.reflex_window"):
                raise UsageError(f"--config.{key} is what the search sets; use --n_layer, "
                                 "--min_embd/--max_embd/--step and --head_dim instead.")
            apply_override(config, key, raw)
        return run(args, config, target, rest)


def run(args, config, target, overrides: Sequence[str]) -> int:
    from reflex_lab.machine import cpu_count, cpu_model
    hbm = target.chip.hbm_bytes
    doc = {"target": target.name, "device_kind": target.devices[0].device_kind,
           "n_devices": target.n_devices, "n_hosts": target.n_hosts, "hbm_bytes": hbm,
           "mesh": {"data": config.mesh.data, "fsdp": config.mesh.fsdp,
                    "tensor": config.mesh.tensor},
           "config": args.config, "overrides": list(overrides), "head_dim": args.head_dim,
           "step": args.step, "batch_size": config.batch_size, "grad_accum": config.grad_accum,
           "block_size": config.model.block_size, "dtype": config.model.dtype,
           "head_plan": config.model.head_plan, "command": "python -m reflex_lab.fit " +
           " ".join(sys.argv[1:]), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "cpu": cpu_model(), "cores": cpu_count(), "searches": []}
    save = (lambda: write_doc(args.out, doc)) if args.out else (lambda: None)
    prober = Prober(config, target, args.head_dim, log=print)
    t0 = time.perf_counter()
    for n_layer in args.n_layer:
        print(f"{target.name}: n_layer {n_layer}, n_embd in steps of {args.step}, "
              f"HBM {_gib(hbm)} per chip", flush=True)
        record = {"n_layer": n_layer, "probes": []}
        doc["searches"].append(record)
        search(prober, n_layer, args, hbm, save, record)
        fit, no = record["largest_fit"], record["smallest_no_fit"]
        print(f"{target.name} n_layer {n_layer}: largest fit "
              + (f"n_embd {fit['n_embd']} ({fit['params'] / 1e9:.2f} B params, "
                 f"{_gib(fit['peak_total_bytes'])})" if fit else "none")
              + (f"; n_embd {no['n_embd']} does not fit ({_gib(no['peak_total_bytes'])})"
                 if no else ""), flush=True)
    doc["search_s"] = time.perf_counter() - t0
    save()
    return 0


def write_doc(path: str, doc: dict) -> None:
    """`doc` as JSON at `path` (its directory made), rewritten whole."""
    from reflex_jax.checkpoint import write_json
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_json(path, doc)


if __name__ == "__main__":
    sys.exit(main())
