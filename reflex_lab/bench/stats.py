"""Ratios of step times with their 95% intervals, from paired, interleaved reps.

`timing.interleaved` runs every contender once per round, so rep i of A and rep i of B ran side by
side (same load, same heap, same clock speed); their ratio cancels what drifts between rounds. A
ratio is the geometric mean of the per-round ratios, and its interval a Student t interval on the
log ratios (n - 1 degrees of freedom), turned back into ratios: it is asymmetric around the
estimate and never crosses 0. With one round there is no interval (None).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

LEVEL = 0.95


def paired_ratio(a: Sequence[float], b: Sequence[float], keep: Optional[Sequence[bool]] = None) -> dict:
    """{"ratio", "ci95": [lo, hi] or None, "n", "dropped", "per_rep"} of times `a` over times `b`,
    where a[i] and b[i] come from the same round; with `keep`, only the rounds it marks True count
    (timing.steady_pairs: rounds where a call grew the heap are dropped), unless it marks none."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired ratios need as many reps of each side ({len(a)} vs {len(b)})")
    per_rep = np.asarray(a, float) / np.asarray(b, float)
    mask = np.asarray(keep, bool) if keep is not None and any(keep) else np.ones(len(per_rep), bool)
    logs = np.log(per_rep[mask])
    n = len(logs)
    est = float(math.exp(logs.mean()))
    ci: Optional[list] = None
    if n > 1:
        from scipy.stats import t
        half = float(t.ppf(0.5 + LEVEL / 2, n - 1) * logs.std(ddof=1) / math.sqrt(n))
        ci = [float(math.exp(logs.mean() - half)), float(math.exp(logs.mean() + half))]
    return {"ratio": est, "ci95": ci, "n": n, "dropped": int(len(per_rep) - n), "per_rep": per_rep.tolist()}


def half_width(ci: Optional[Sequence[float]], ratio: float) -> Optional[float]:
    """The larger distance from the ratio to an end of its interval, relative to the ratio."""
    if not ci:
        return None
    return max(ratio - ci[0], ci[1] - ratio) / ratio


def fmt_ratio(r: Optional[dict], digits: int = 3) -> str:
    """'1.012 [0.991, 1.034]' (or the bare ratio without an interval, '–' for none)."""
    if not r or r.get("ratio") is None:
        return "–"
    text = f"{r['ratio']:.{digits}f}"
    if r.get("ci95"):
        lo, hi = r["ci95"]
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text
