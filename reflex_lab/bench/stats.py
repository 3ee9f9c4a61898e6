"""Ratios of step times with their 95% intervals, from paired, interleaved reps.

`timing.interleaved` runs every contender once per round, so rep i of A and rep i of B ran side by
side (same load, same heap, same clock speed); their ratio cancels what drifts between rounds. A
ratio is the 20% trimmed mean of the log per-round ratios, turned back into a ratio, and its
interval Yuen's trimmed t interval (winsorized variance, n - 2g - 1 degrees of freedom, g =
floor(0.2 n) rounds trimmed at each end): asymmetric around the estimate, never crossing 0. Why
trimmed: a shared machine now and then slows one round of one contender by 2-3x, and a mean
follows such a round, so back-to-back runs disagreed more with geometric means than with
trimmed ones (docs/bench.md). Below 5 rounds nothing is trimmed (a plain t interval on the
logs); with one round there is no interval (None).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

LEVEL = 0.95
TRIM = 0.2  # of the rounds at each end


def paired_ratio(a: Sequence[float], b: Sequence[float], keep: Optional[Sequence[bool]] = None) -> dict:
    """{"ratio", "ci95": [lo, hi] or None, "log_se" (standard error of the log ratio, or None),
    "n", "dropped", "per_rep"} of times `a` over times `b`, where a[i] and b[i] come from the
    same round; with `keep`, only the rounds it marks True count
    (timing.steady_pairs: rounds where a call grew the heap are dropped), unless it marks none."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired ratios need as many reps of each side ({len(a)} vs {len(b)})")
    per_rep = np.asarray(a, float) / np.asarray(b, float)
    mask = np.asarray(keep, bool) if keep is not None and any(keep) else np.ones(len(per_rep), bool)
    centre, se, df = trimmed_log_estimate(np.log(per_rep[mask]))
    est, ci = _as_ratio_interval(centre, se, df)
    n = int(mask.sum())
    return {"ratio": est, "ci95": ci, "log_se": se, "n": n, "dropped": int(len(per_rep) - n),
            "per_rep": per_rep.tolist()}


def trimmed_log_estimate(logs: np.ndarray, trim: float = TRIM) -> tuple[float, Optional[float], int]:
    """(trimmed mean of `logs`, Yuen's standard error of it or None for n < 2, its degrees of
    freedom n - 2g - 1)."""
    x = np.sort(np.asarray(logs, float))
    n = len(x)
    g = int(math.floor(trim * n))
    centre = float(x[g:n - g].mean())
    if n < 2:
        return centre, None, 0
    w = np.clip(x, x[g], x[n - g - 1])  # winsorized: the trimmed ends set to the nearest kept value
    return centre, float(w.std(ddof=1)) / ((1 - 2 * g / n) * math.sqrt(n)), n - 2 * g - 1


def trimmed_log_interval(logs: np.ndarray, trim: float = TRIM) -> tuple[float, Optional[list]]:
    """(exp of the trimmed mean of `logs`, its Yuen 95% interval as ratios, or None for n < 2)."""
    return _as_ratio_interval(*trimmed_log_estimate(logs, trim))


def _as_ratio_interval(centre: float, se: Optional[float], df: int) -> tuple[float, Optional[list]]:
    """(exp(centre), the t interval centre +- t(df) * se turned into ratios, or None without se)."""
    if se is None:
        return math.exp(centre), None
    from scipy.stats import t
    half = float(t.ppf(0.5 + LEVEL / 2, df)) * se
    return math.exp(centre), [math.exp(centre - half), math.exp(centre + half)]


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
