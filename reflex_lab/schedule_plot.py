"""A picture of a reflex head schedule: layers x heads, every cell coloured by the layer whose K/V
the head reads (a self head by its own layer), labelled with the K/V head it reads.

    python -m reflex_lab.schedule_plot --config configs/reflex.py --out docs/schedule_all_6x8.png
    python -m reflex_lab.schedule_plot --config configs/reflex.py --schedule recent:2,1 \
        --out docs/schedule_recent21_6x8.png
    python -m reflex_lab.schedule_plot --config configs/tiny.py --config.model.n_layer=12 --out x.png

Everything comes from `ModelConfig.layers` (the resolved schedule), never re-derived here.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Optional, Sequence

import numpy as np

from reflex_jax.model import ModelConfig


def source_matrix(cfg: ModelConfig) -> np.ndarray:
    """[n_layer, n_head] int: the layer whose K/V each query head reads (self heads: their own layer).
    Head order is the model's: self heads first, then cross groups in schedule order."""
    m = np.empty((cfg.n_layer, cfg.n_head), dtype=int)
    for plan in cfg.layers:
        row = [plan.layer] * plan.n_self
        for g in plan.cross:
            row += [g.source] * g.n_heads
        m[plan.layer] = row
    return m


def source_head_matrix(cfg: ModelConfig) -> np.ndarray:
    """[n_layer, n_head] int: which K/V head of the source layer each query head reads."""
    m = np.empty((cfg.n_layer, cfg.n_head), dtype=int)
    for plan in cfg.layers:
        row = list(range(plan.n_self))
        for g in plan.cross:
            row += list(g.source_heads)
        m[plan.layer] = row
    return m


def layer_colors(n_layer: int) -> np.ndarray:
    """[n_layer, 4] RGBA, one distinct colour per layer (tab10 up to 10 layers, tab20 up to 20, then
    a continuous map)."""
    import matplotlib
    if n_layer <= 10:
        cols = matplotlib.colormaps["tab10"].colors[:n_layer]
    elif n_layer <= 20:
        cols = matplotlib.colormaps["tab20"].colors[:n_layer]
    else:
        cmap = matplotlib.colormaps["turbo"]
        cols = [cmap(0.05 + 0.9 * i / (n_layer - 1)) for i in range(n_layer)]
    return np.array([matplotlib.colors.to_rgba(c) for c in cols])


@dataclasses.dataclass
class SchedulePicture:
    sources: np.ndarray        # [L, H] source layer per head
    source_heads: np.ndarray   # [L, H] K/V head index in the source layer
    colors: np.ndarray         # [L, H, 4] RGBA fill of every cell, as plotted
    labels: list               # [L][H] cell text
    cell_boxes: np.ndarray     # [L, H, 4] (x0, y0, x1, y1) pixel box of each cell in the saved PNG
    size: tuple                # (width, height) of the PNG in pixels
    path: Optional[str]


def plot_schedule(cfg: ModelConfig, path: Optional[str] = None, *, title: Optional[str] = None,
                  dpi: int = 100) -> SchedulePicture:
    """Draw the schedule of `cfg` (and save it as a PNG at `path`). Layer 0 is the top row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    L, H = cfg.n_layer, cfg.n_head
    sources, heads = source_matrix(cfg), source_head_matrix(cfg)
    palette = layer_colors(L)
    colors = palette[sources]
    labels = [["S" if sources[l, h] == l else f"L{sources[l, h]}" for h in range(H)] for l in range(L)]
    sub = [[f"h{heads[l, h]}" for h in range(H)] for l in range(L)]

    width = max(8.0, 0.7 * H + 2.4)
    height = max(5.0, 0.5 * L + 1.9)
    fig = plt.figure(figsize=(width, height), dpi=dpi)
    # fixed margins in inches (left: layer names, right: n_self+n_cross, bottom: axis label and
    # legend, top: titles), no tight/constrained layout, so the cell boxes below are where the PNG has them
    left, right, bottom, top = 0.9, 0.7, 0.95, 0.85
    ax = fig.add_axes((left / width, bottom / height, 1 - (left + right) / width,
                       1 - (bottom + top) / height))
    ax.imshow(colors, interpolation="nearest", aspect="auto")
    for l in range(L):
        for h in range(H):
            r, g, b, _ = colors[l, h]
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"
            small = H > 16 or L > 16
            ax.text(h, l + 0.05, labels[l][h] + ("" if small else "\n" + sub[l][h]), ha="center",
                    va="center", fontsize=6 if small else 8, color=ink,
                    fontweight="bold" if labels[l][h] == "S" else "normal")
    ax.set_xticks(range(H), [str(h) for h in range(H)], fontsize=8)
    ax.set_yticks(range(L), [f"layer {l}" for l in range(L)], fontsize=8)
    ax.set_xticks(np.arange(-0.5, H, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, L, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("query head (self heads first, then cross heads in schedule order)", fontsize=8)
    for l, plan in enumerate(cfg.layers):
        ax.text(H - 0.4, l, f" {plan.n_self}" + (f"+{plan.n_cross}" if plan.cross else ""),
                ha="left", va="center", fontsize=9)
    name = cfg.reflex if isinstance(cfg.reflex, str) else "explicit"
    kv = cfg.kv_heads_total
    fig.suptitle(title or f"reflex schedule '{name}', {L} layers x {H} heads: KV cache {kv}/{L * H} heads "
                 f"({100 * kv / (L * H):.0f}%)", fontsize=10, y=1 - 0.25 / height)
    ax.set_title("cell colour = layer whose K/V the head reads; S = own (self) head, Lj = borrowed "
                 "from layer j; hk = K/V head read", fontsize=7.5)
    handles = [Patch(color=palette[l], label=f"L{l}") for l in range(L)]
    fig.legend(handles=handles, loc="lower center", ncol=min(L, 12), fontsize=7, frameon=False,
               bbox_to_anchor=(0.5, 0.0))

    fig.canvas.draw()
    size = fig.canvas.get_width_height()
    boxes = np.zeros((L, H, 4))
    for l in range(L):
        for h in range(H):
            (x0, y0), (x1, y1) = ax.transData.transform([(h - 0.5, l + 0.5), (h + 0.5, l - 0.5)])
            boxes[l, h] = (x0, size[1] - y0, x1, size[1] - y1)  # image rows count from the top
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return SchedulePicture(sources, heads, colors, labels, boxes, tuple(size), path)


PROG = "python -m reflex_lab.schedule_plot"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                description="Draw a reflex head schedule as a PNG (layers x heads).")
    p.add_argument("--config", default="configs/reflex.py", help="config file (default configs/reflex.py)")
    p.add_argument("--schedule", default="", help="override model.reflex, e.g. all, none, recent:2,1")
    p.add_argument("--out", required=True, help="PNG path to write")
    p.add_argument("--title", default="", help="figure title (default: schedule and KV-cache share)")
    return p


def _draw(argv: Optional[Sequence[str]]) -> int:
    from reflex_jax.errors import UsageError
    from reflex_jax.run_config import load_config, model_config_from, split_overrides

    args, rest = build_parser().parse_known_args(argv)
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out {args.out!r} must be a .png file path.")
    config = load_config(args.config, split_overrides(rest))
    if args.schedule:
        config.model.reflex = args.schedule
    cfg = model_config_from(config)
    pic = plot_schedule(cfg, args.out, title=args.title or None)
    print(cfg.schedule_table())
    print(f"wrote {args.out} ({pic.size[0]}x{pic.size[1]}, {os.path.getsize(args.out) / 1024:.0f} KB)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Draw the schedule; 0, or 2 after printing a user's mistake as one line."""
    from reflex_jax.cli import user_errors_as_status
    return user_errors_as_status(PROG, lambda: _draw(argv))


if __name__ == "__main__":
    sys.exit(main())
