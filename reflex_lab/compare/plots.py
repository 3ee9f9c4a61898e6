"""The curves of a grid as small PNGs: validation loss vs step and vs tokens, exact match vs step;
one line per group (the mean over its finished seeds), a band for the min–max over seeds."""
from __future__ import annotations

import os
from typing import Sequence

from .grid import Run
from .stats import distance_keys

# (metric, x, file name, y label, x label)
PLOTS = [("val_loss", "step", "val_loss_vs_step.png", "validation loss", "step"),
         ("val_loss", "tokens", "val_loss_vs_tokens.png", "validation loss", "training tokens"),
         ("exact_match", "step", "exact_match_vs_step.png", "exact match (held-out)", "step")]


def _curves(runs: Sequence[Run], summaries: Sequence[dict], key: str, x: str):
    """{group: (xs, mean, lo, hi, n)} over the finished runs, at the x values all of them logged."""
    import numpy as np
    finished = {s["name"]: s for s in summaries if s["status"] == "finished"}
    per_group: dict[str, list[dict]] = {}
    for run in runs:
        if run.name not in finished:
            continue
        # a summary recorded before curves were kept has none: that run is left out of the curves
        rows = finished[run.name].get("curve", [])
        pts = {r[x]: r[key] for r in rows if r.get(key) is not None and x in r}
        if pts:
            per_group.setdefault(run.group, []).append(pts)
    out = {}
    for group, series in per_group.items():
        xs = sorted(set.intersection(*(set(p) for p in series)))
        if not xs:
            continue
        ys = np.array([[p[v] for v in xs] for p in series], dtype=float)
        out[group] = (np.array(xs, float), ys.mean(0), ys.min(0), ys.max(0), len(series))
    return out


def _draw_panels(axes, curves: dict, colour_of, xlabel: str) -> None:
    """Every group's mean line and min–max band; the second panel (if any) shows the second half."""
    for i, ax in enumerate(axes):
        for group, (xs, mean, lo, hi, n) in curves.items():
            keep = xs >= xs.max() / 2 if i == 1 else slice(None)
            c = colour_of(group)
            ax.plot(xs[keep], mean[keep], color=c, lw=1.8, marker="o", ms=3, label=f"{group} (n={n})")
            if n > 1:
                ax.fill_between(xs[keep], lo[keep], hi[keep], color=c, alpha=0.2, lw=0)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if i == 1:
            ax.set_title("second half (zoom)", fontsize=9)


def plot_curves(out_dir: str, runs: Sequence[Run], summaries: Sequence[dict]) -> list[str]:
    """val loss vs step and vs tokens, exact match vs step (when logged): one line per group, bands
    min–max over seeds. 800x500 PNGs. Returns the file names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    colors = plt.get_cmap("tab10").colors
    order = list(dict.fromkeys(r.group for r in runs))
    for key, x, fname, ylabel, xlabel in PLOTS:
        curves = _curves(runs, summaries, key, x)
        if not curves:
            continue
        # loss curves get a second panel zoomed on the second half of training, where the
        # schedules differ by little next to the early drop
        zoom = key == "val_loss" and any(len(c[0]) > 2 for c in curves.values())
        fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(8, 5), dpi=100, squeeze=False,
                                 gridspec_kw={"width_ratios": [3, 2]} if zoom else None)
        _draw_panels(axes[0], curves, lambda g: colors[order.index(g) % len(colors)], xlabel)
        ax0 = axes[0][0]
        ax0.set_ylabel(ylabel)
        if key == "exact_match":
            ax0.set_ylim(-0.02, 1.02)
        ax0.legend(fontsize=8)
        fig.suptitle(f"{ylabel} vs {xlabel}: mean over seeds, band = min–max over seeds", fontsize=10)
        written.append(_save(plt, fig, out_dir, fname))
    return written


def shrink_png(path: str, colors: int = 64) -> None:
    """Rewrite a plot PNG with a palette of `colors` colours (line plots use a handful; the bands'
    blends need a few dozen): about a quarter of the RGBA size, so results stay small in git."""
    from PIL import Image
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    return plt, fig, ax


def _save(plt, fig, out_dir: str, fname: str) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, fname), dpi=100)
    plt.close(fig)
    shrink_png(os.path.join(out_dir, fname))
    return fname


def plot_group_summaries(out_dir: str, groups: Sequence[dict]) -> list[str]:
    """Two plots of the groups' final numbers (when logged): `bpb_vs_kv_bytes.png`, held-out bits
    per byte against KV-cache bytes per token (the memory/quality trade-off, error bars = std over
    seeds), and `exact_match_by_distance.png`, key-value recall exact match by recall distance."""
    written = []
    pts = [g for g in groups if g.get("final_val_bpb", {}).get("n")]
    if pts:
        plt, fig, ax = _figure()
        colors = plt.get_cmap("tab10").colors
        for i, g in enumerate(pts):
            stat = g["final_val_bpb"]
            ax.errorbar(g["kv_bytes_per_token"], stat["mean"], yerr=stat["std"] or 0, fmt="o", ms=6,
                        capsize=4, color=colors[i % len(colors)], label=f"{g['group']} (n={stat['n']})")
        ax.set_xlabel("KV-cache bytes per token")
        ax.set_ylabel("held-out bits per byte (final)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("held-out bits per byte vs KV cache: mean over seeds, bars = sample std", fontsize=10)
        written.append(_save(plt, fig, out_dir, "bpb_vs_kv_bytes.png"))
    keys = distance_keys(groups, "final_")
    curves = [g for g in groups if any(g.get(k, {}).get("n") for k in keys)]
    if curves:
        plt, fig, ax = _figure()
        colors = plt.get_cmap("tab10").colors
        for i, g in enumerate(curves):
            have = [(int(k.rsplit("d", 1)[1]), g[k]) for k in keys if g.get(k, {}).get("n")]
            ax.errorbar([d for d, _ in have], [s["mean"] for _, s in have],
                        yerr=[s["std"] or 0 for _, s in have], marker="o", ms=4, capsize=3, lw=1.5,
                        color=colors[i % len(colors)], label=g["group"])
        ax.set_xlabel("recall distance (pairs between the asked pair and the question)")
        ax.set_ylabel("exact match (final, held-out)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("key-value recall by distance: mean over seeds, bars = sample std", fontsize=10)
        written.append(_save(plt, fig, out_dir, "exact_match_by_distance.png"))
    return written
