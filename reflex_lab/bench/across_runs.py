"""Step ratios across several runs of bench.py: `python -m reflex_lab.bench.across_runs A.json B.json ...`.

One run's interval (stats.py) covers the noise within that run. Between runs, things shift that
pairing within a run cannot cancel: each process compiles its own programs (`torch.compile`'s
among them), lays out its own heap, and meets the machine in another state. Here each run is one
sample: its ratio (the paired, trimmed estimate of stats.py, recomputed from its per-rep times) is
taken per run, and the across-runs ratio is their geometric mean with a Student t interval over
runs (n - 1 degrees of freedom). Runs must share their settings (model, dtypes, contenders).

`heterogeneity` says whether more reps per run could make runs agree: Cochran's Q tests whether
the runs' log ratios differ by more than their within-run standard errors allow, and tau (the
DerSimonian-Laird estimate) is the spread between runs that is left once those errors are taken
out. Two runs differ by about sqrt(2) * tau however many reps each takes.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np

from reflex_jax.errors import UsageError

from .report import STEP_RATIOS, paired_step_ratio
from .stats import fmt_ratio, trimmed_log_interval

# settings that may differ between runs that measure the same train steps: the rep counts, and
# generation's, which runs after every train step is timed
_FREE = {"train_reps", "name", "gen", "gen_prompts", "gen_batches", "gen_new_tokens",
         "gen_recompute_tokens", "gen_reps", "hf"}


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
                    "ratio": ratio, "ci95": ci, "n": len(values),
                    "heterogeneity": heterogeneity(np.log(values), [p[key].get("log_se") for p in per])}
    return {"runs": names, "ratios": out}


def heterogeneity(logs: Sequence[float], ses: Sequence[Optional[float]]) -> Optional[dict]:
    """{"q", "p", "i2", "tau", "within_se"} of per-run log ratios `logs` with within-run standard
    errors `ses` (None when a run has none, or a standard error is 0): Cochran's Q on k - 1 degrees
    of freedom, I^2 = (Q - (k - 1)) / Q, the between-run standard deviation tau (DerSimonian-Laird)
    and the runs' root mean square within-run standard error, tau and within_se in log units
    (0.01 is about 1%)."""
    if any(s is None or s <= 0 for s in ses) or len(logs) < 2:
        return None
    from scipy.stats import chi2
    y, w = np.asarray(logs, float), 1.0 / np.square(np.asarray(ses, float))
    k = len(y)
    q = float(np.sum(w * np.square(y - np.sum(w * y) / np.sum(w))))
    tau2 = max(0.0, (q - (k - 1)) / (np.sum(w) - np.sum(np.square(w)) / np.sum(w)))
    return {"q": q, "p": float(chi2.sf(q, k - 1)), "i2": max(0.0, (q - (k - 1)) / q) if q else 0.0,
            "tau": float(np.sqrt(tau2)), "within_se": float(np.sqrt(np.mean(1.0 / w)))}


def agree_within(tau: float, within_se: float, band: float) -> float:
    """The chance that two runs' ratios agree within +-`band` (0.03: 3%), their log difference
    normal with variance 2 * (tau^2 + within_se^2)."""
    from scipy.stats import norm
    sd = math.sqrt(2 * (tau ** 2 + within_se ** 2))
    if sd == 0:
        return 1.0
    return float(2 * norm.cdf(math.log1p(band) / sd) - 1)


def table(result: dict) -> str:
    lines = ["| ratio | " + " | ".join(result["runs"]) + " | across runs |",
             "|---|" + "---|" * len(result["runs"]) + "---|"]
    for key, r in result["ratios"].items():
        cells = [fmt_ratio({"ratio": v, "ci95": ci}) for v, ci in zip(r["per_run"], r["per_run_ci95"])]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {fmt_ratio(r)} |")
    return "\n".join(lines)


def heterogeneity_table(result: dict, band: float = 0.03) -> str:
    """Per ratio: the within-run and between-run spreads (%), Q's p-value, and the chance that two
    runs agree within +-band: as measured (within_se of these runs) and with infinitely many reps
    (tau alone)."""
    pct = round(band * 100)
    lines = [f"| ratio | within-run se | between-run tau | I^2 | Q p | P(two runs within +-{pct}%) "
             f"| same, reps -> infinity |", "|---|---:|---:|---:|---:|---:|---:|"]
    for key, r in result["ratios"].items():
        h = r.get("heterogeneity")
        if not h:
            lines.append(f"| {key} | – | – | – | – | – | – |")
            continue
        lines.append(f"| {key} | {100 * h['within_se']:.1f}% | {100 * h['tau']:.1f}% | "
                     f"{100 * h['i2']:.0f}% | {h['p']:.3f} | "
                     f"{agree_within(h['tau'], h['within_se'], band):.2f} | "
                     f"{agree_within(h['tau'], 0.0, band):.2f} |")
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
    print()
    print(heterogeneity_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    from reflex_jax.cli import exit_on_user_error
    with exit_on_user_error("across_runs", traceback=False):
        sys.exit(main())
