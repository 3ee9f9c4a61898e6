"""Evaluate a run on lm-evaluation-harness tasks with the JAX decoder (or an HF export with
--backend hf; docs/export.md).

    reflex-eval --run runs/reflex --tasks xstorycloze_ru,xwinograd_ru --out results.json
    reflex-eval --run runs/tiny --tasks my_task --include_path tasks/ --limit 50
    reflex-eval --run runs/tiny --tasks my_task --include_path tasks/ --backend hf

Needs lm-eval: `pip install -e '.[eval]'`. Prints one line per task and metric; `--out` also
writes them as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ..errors import UsageError
from . import quiet_start, user_errors_as_status

PROG = "reflex-eval"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory (train.py) or params directory")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--limit", type=float, default=None,
                   help="at most this many documents per task (below 1: a fraction of them)")
    p.add_argument("--include_path", default=None, help="directory of extra task YAML files")
    p.add_argument("--backend", default="jax", help="jax (default: the JAX decoder on this host's "
                   "devices) or hf (an HF export under lm-eval's hf model, on PyTorch)")
    p.add_argument("--batch_size", type=int, default=8, help="rows per forward pass (default 8)")
    p.add_argument("--fsdp", type=int, default=1, help="jax: mesh fsdp size (default 1)")
    p.add_argument("--tensor", type=int, default=1, help="jax: mesh tensor size (default 1)")
    p.add_argument("--add_bos", action="store_true",
                   help="jax: start every context with bos, as the training rows start")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: best)")
    p.add_argument("--export_dir", default=None,
                   help="hf: keep the HF export here (default: a temporary directory)")
    p.add_argument("--device", default=None, help="hf: torch device, e.g. cpu or cuda:0 "
                   "(default: cuda if torch has it, else cpu)")
    p.add_argument("--out", default=None, help="write the metrics to this JSON file")
    return p.parse_args(argv)


def _limit(value: Optional[float]):
    if value is None:
        return None
    if value <= 0:
        raise UsageError(f"--limit {value:g} must be positive (a count, or a fraction below 1).")
    return int(value) if value >= 1 and value == int(value) else value


def evaluate(args) -> dict:
    from ..harness import evaluate_run
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.batch_size < 1:
        raise UsageError(f"--batch_size {args.batch_size} must be at least 1.")
    for name in ("fsdp", "tensor"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)} must be at least 1.")
    if args.backend != "jax" and (args.fsdp, args.tensor, args.add_bos) != (1, 1, False):
        raise UsageError("--fsdp, --tensor and --add_bos are for --backend jax; drop them for "
                         "--backend hf.")
    for flag, value in (("--export_dir", args.export_dir), ("--device", args.device)):
        if args.backend == "jax" and value is not None:
            raise UsageError(f"{flag} is for --backend hf; the jax backend exports nothing and "
                             "runs on JAX's devices.")
    return evaluate_run(args.run, tasks, backend=args.backend, out_dir=args.export_dir,
                        limit=_limit(args.limit), batch_size=args.batch_size,
                        include_path=args.include_path, step=args.step, device=args.device,
                        fsdp=args.fsdp, tensor=args.tensor, add_bos_token=args.add_bos)


def metric_lines(metrics: dict) -> list[str]:
    return [f"{task} {name} {value:.4f}" for task, values in metrics.items()
            for name, value in values.items()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    metrics = {}
    status = user_errors_as_status(PROG, lambda: metrics.update(evaluate(args)))
    if status:
        return status
    for line in metric_lines(metrics):
        print(line)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
    return 0


def run():
    """Console-script entry (reflex-eval)."""
    quiet_start()
    sys.exit(main())


if __name__ == "__main__":
    run()
