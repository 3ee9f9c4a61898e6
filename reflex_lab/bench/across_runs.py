"""Step ratios across several runs of bench.py: `python -m reflex_lab.bench.across_runs A.json B.json ...`.

One run's interval (stats.py) covers the noise within that run. Between runs, things shift that
pairing within a run cannot cancel: each process compiles its own programs (`torch.compile`'s
among them), lays out its own heap, and meets the machine in another state. Here each run is one
sample: its ratio (the paired, trimmed estimate of stats.py, recomputed from its per-rep times) is
taken per run, and the across-runs ratio is their geometric mean with a Student t interval over
runs (n - 1 degrees of freedom). Runs must share their settings (model, dtypes, contenders).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

from reflex_jax.errors import UsageError

from .report import STEP_RATIOS, paired_step_ratio
from .stats import fmt_ratio, trimmed_log_interval

# settings that may differ between runs that measure the same thing
_FREE = {"train_reps", "gen_reps", "name"}


def run_ratios(report: dict) -> dict:
    """{"<ratio key> <dtype>": the paired ratio dict (stats.paired_ratio)} of one run's JSON."""
    out = {}
    for dtype in report["settings"]["dtypes"]:
        for key, (num, den) in STEP_RATIOS.items():
            a, b = report["train"].get(f"{num} {dtype}"), report["train"].get(f"{den} {dtype}")
            if a and b:
                out[f"{key} {dtype}"] = paired_step_ratio(a, b)
    return out


def across_runs(reports: Sequence[dict], names: Optional[Sequence[str]] = None) -> dict:
    """{"runs": names, "ratios": {key: {"per_run", "per_run_ci95", "ratio", "ci95", "n"}}} over the
    keys every run has."""
    names = list(names or [f"run {i + 1}" for i in range(len(reports))])
    if len(reports) < 2:
        raise UsageError("across_runs needs the JSON files of at least two bench.py runs.")
    first = {k: v for k, v in reports[0]["settings"].items() if k not in _FREE}
    for name, r in zip(names[1:], reports[1:]):
        other = {k: v for k, v in r["settings"].items() if k not in _FREE}
        if other != first:
            diff = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise UsageError(f"{name} was measured with other settings than {names[0]} "
                             f"({', '.join(diff)}); combine runs of the same bench.py command.")
    per = [run_ratios(r) for r in reports]
    keys = [k for k in per[0] if all(k in p for p in per[1:])]
    out = {}
    for key in keys:
        values = [p[key]["ratio"] for p in per]
        ratio, ci = trimmed_log_interval(np.log(values), trim=0.0)
        out[key] = {"per_run": values, "per_run_ci95": [p[key]["ci95"] for p in per],
                    "ratio": ratio, "ci95": ci, "n": len(values)}
    return {"runs": names, "ratios": out}


def table(result: dict) -> str:
    lines = ["| ratio | " + " | ".join(result["runs"]) + " | across runs |",
             "|---|" + "---|" * len(result["runs"]) + "---|"]
    for key, r in result["ratios"].items():
        cells = [fmt_ratio({"ratio": v, "ci95": ci}) for v, ci in zip(r["per_run"], r["per_run_ci95"])]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {fmt_ratio(r)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("reports", nargs="+", help="bench.py --json files of the same settings")
    p.add_argument("--json", help="write the combined ratios here")
    args = p.parse_args(argv)
    reports = []
    for path in args.reports:
        try:
            with open(path) as f:
                reports.append(json.load(f))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read the bench.py JSON {path!r} ({e}).") from None
        if "train" not in reports[-1] or "settings" not in reports[-1]:
            raise UsageError(f"{path!r} is not a bench.py --json file with train steps.")
    result = across_runs(reports, [os.path.basename(p) for p in args.reports])
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    from reflex_jax.cli import exit_on_user_error
    with exit_on_user_error("across_runs", traceback=False):
        sys.exit(main())
