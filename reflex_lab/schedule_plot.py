"""A picture of a reflex head plan: layers x heads, every cell coloured by the layer whose K/V
the head reads (a self head by its own layer), labelled with the K/V head it reads. Share-V heads
(`sharev:`) are marked `Ljv`, routed heads (`route`) `R` in a lighter shade of their starting
source, and heads a layer does not have (`fewer:`) are left blank.

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

from reflex_jax.model import ModelConfig, kv_bytes_per_token

NO_HEAD = -1  # a query head the layer does not have (`fewer:` layers have fewer than n_head)


def _padded(row: list, n_head: int) -> list:
    return row + [NO_HEAD] * (n_head - len(row))


def source_matrix(cfg: ModelConfig) -> np.ndarray:
    """[n_layer, n_head] int: the layer whose K/V each query head reads (self heads: their own layer;
    routed heads: their starting source; NO_HEAD past a layer's query heads). Head order is the
    model's: self heads first, then cross groups in schedule order."""
    m = np.empty((cfg.n_layer, cfg.n_head), dtype=int)
    for plan in cfg.layers:
        row = [plan.layer] * plan.n_self
        for g in plan.cross:
            row += [g.source] * g.n_heads
        m[plan.layer] = _padded(row, cfg.n_head)
    return m


def source_head_matrix(cfg: ModelConfig) -> np.ndarray:
    """[n_layer, n_head] int: which K/V head of the source layer each query head reads (a GQA self
    head: the K/V head its group shares; NO_HEAD past a layer's query heads)."""
    m = np.empty((cfg.n_layer, cfg.n_head), dtype=int)
    for plan in cfg.layers:
        row = list(plan.self_kv_heads)
        for g in plan.cross:
            row += list(g.source_heads)
        m[plan.layer] = _padded(row, cfg.n_head)
    return m


def cell_labels(cfg: ModelConfig) -> tuple[list, list]:
    """([L][H] main label, [L][H] second line) of every cell: `S` self, `Lj` K/V of layer j, `Ljv`
    only V of layer j (own K), `R` a routed head (second line: the layers it mixes), '' no head."""
    labels, subs = [], []
    for plan in cfg.layers:
        row = ["S"] * plan.n_self
        sub = [f"h{k}" for k in plan.self_kv_heads]
        for g in plan.cross:
            if g.mixture:
                layers = sorted(src for src, _ in g.mixture)
                span = f"L{layers[0]}" + (f"-{layers[-1]}" if len(layers) > 1 else "")
                row += ["R" + ("v" if g.share == "v" else "")] * g.n_heads
                sub += [span] * g.n_heads
            else:
                row += [f"L{g.source}" + ("v" if g.share == "v" else "")] * g.n_heads
                sub += [f"h{k}" for k in g.source_heads]
        labels.append(_padded(row, cfg.n_head)[:cfg.n_head])
        subs.append(_padded(sub, cfg.n_head)[:cfg.n_head])
    labels = [[x if x != NO_HEAD else "" for x in row] for row in labels]
    subs = [[x if x != NO_HEAD else "" for x in row] for row in subs]
    return labels, subs


def cell_colors(cfg: ModelConfig, sources: np.ndarray, labels: list) -> np.ndarray:
    """[L, H, 4] RGBA: the source layer's colour; routed heads half-way to white; no head white."""
    colors = layer_colors(cfg.n_layer)[np.maximum(sources, 0)]
    for l in range(cfg.n_layer):
        for h in range(cfg.n_head):
            if sources[l, h] == NO_HEAD:
                colors[l, h] = (1.0, 1.0, 1.0, 1.0)
            elif labels[l][h].startswith("R"):
                colors[l, h, :3] = 0.5 + 0.5 * colors[l, h, :3]
    return colors


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
    labels, sub = cell_labels(cfg)
    colors = cell_colors(cfg, sources, labels)

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
        ax.text(H - 0.4, l, f" {plan.short()}", ha="left", va="center", fontsize=9)
    name = cfg.head_plan if isinstance(cfg.head_plan, str) else "explicit"
    kv = cfg.kv_heads_total
    share = kv_bytes_per_token(cfg) / (2 * L * H * cfg.head_dim * np.dtype(cfg.compute_dtype).itemsize)
    fig.suptitle(title or f"reflex schedule '{name}'{' + value residual' if cfg.value_residual else ''}, "
                 f"{L} layers x {H} heads: KV cache {kv:g}/{L * H} heads ({100 * share:.0f}%)",
                 fontsize=10, y=1 - 0.25 / height)
    ax.set_title(_legend_line(labels), fontsize=7.5)
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


def _legend_line(labels: list) -> str:
    """The key under the title: the basic marks always, the variants' marks where they occur."""
    cells = {x for row in labels for x in row}
    parts = ["cell colour = layer whose K/V the head reads; S = own (self) head, Lj = borrowed "
             "from layer j; hk = K/V head read"]
    if any(x.endswith("v") for x in cells):
        parts.append("Ljv = V of layer j, own K")
    if any(x.startswith("R") for x in cells):
        parts.append("R = learned mix of layers La-b")
    if "" in cells:
        parts.append("blank = no query head")
    return "; ".join(parts)


PROG = "python -m reflex_lab.schedule_plot"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, allow_abbrev=False,
                                description="Draw a reflex head schedule as a PNG (layers x heads).")
    p.add_argument("--config", default="configs/reflex.py", help="config file (default configs/reflex.py)")
    p.add_argument("--schedule", default="", help="override model.head_plan, e.g. all, none, recent:2,1")
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
        config.model.head_plan = args.schedule
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
