"""The head schedule: which earlier layers each layer borrows K/V from, with how many heads.

A schedule (a preset string or explicit per-layer tuples) resolves once, when the ModelConfig is
built, into one `LayerPlan` per layer; the rest of the code reads those plans and never re-derives
the rules. The rules themselves are in docs/attention.md.
"""
from __future__ import annotations

import ast
import dataclasses

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class CrossGroup:
    """`n_heads` query heads of a layer that read K/V heads `source_heads` of layer `source`."""
    source: int
    n_heads: int
    source_heads: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer's head split: self heads first, then cross groups in schedule order."""
    layer: int
    n_self: int
    cross: tuple[CrossGroup, ...]

    @property
    def n_cross(self) -> int:
        return sum(g.n_heads for g in self.cross)

    def short(self) -> str:
        return f"{self.n_self}" + (f"+{self.n_cross}" if self.cross else "")


Schedule = tuple[tuple[tuple[int, int], ...], ...]  # per layer: ((source, n_heads), ...)

SCHEDULE_EXAMPLE = "((), ((0, 1),), ((1, 1), (0, 1)))"  # 3 layers; shown in the errors


def as_schedule_tuple(value) -> Schedule:
    try:
        return tuple(tuple((int(src), int(c)) for src, c in layer) for layer in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"model.reflex={value!r} is neither a preset ('none', 'all', 'recent:c1,c2,...') nor a "
            f"per-layer tuple of (source_layer, n_heads) pairs such as {SCHEDULE_EXAMPLE!r}."
        ) from None


def parse_schedule(value):
    """A preset name as given, or the explicit schedule of a tuple / list / its Python text
    (command lines and JSON can only carry the text), as a tuple of ((source, n_heads), ...)."""
    if not isinstance(value, str):
        return as_schedule_tuple(value)
    if not value.strip().startswith(("(", "[")):
        return value
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ConfigError(
            f"model.reflex={value!r} is not a valid per-layer schedule; write one tuple of "
            f"(source_layer, n_heads) pairs per layer, e.g. {SCHEDULE_EXAMPLE!r} for 3 layers."
        ) from None
    if isinstance(parsed, str):  # '("all")' is just a parenthesised preset name
        return parsed
    return as_schedule_tuple(parsed)


def _preset(cfg) -> Schedule:
    L, H, name = cfg.n_layer, cfg.n_head, cfg.reflex.strip()
    if name == "none":
        return tuple(() for _ in range(L))
    if name == "all":
        window = cfg.reflex_window
        if window is not None and window < 0:
            raise ConfigError(f"model.reflex_window={window} must be >= 0 (or None for no limit).")
        schedule = []
        for layer in range(L):
            n_src = layer if window is None else min(layer, window)
            if H - n_src < cfg.reflex_min_self:
                max_window = H - cfg.reflex_min_self
                raise ConfigError(
                    f"reflex 'all': layer {layer} would borrow from {n_src} earlier layers and keep "
                    f"{H - n_src} self heads (< reflex_min_self={cfg.reflex_min_self}) with "
                    f"{H} heads; 'all' never drops sources silently, so set "
                    f"model.reflex_window <= {max_window}.")
            schedule.append(tuple((layer - k, 1) for k in range(1, n_src + 1)))
        return tuple(schedule)
    if name.startswith("recent:"):
        try:
            counts = [int(c) for c in name[len("recent:"):].split(",") if c.strip()]
        except ValueError:
            counts = []
        if not counts or any(c < 0 for c in counts):
            raise ConfigError(f"model.reflex={name!r}: 'recent:' needs non-negative head counts, "
                              "e.g. 'recent:2,1'.")
        return tuple(tuple((layer - k, c) for k, c in enumerate(counts, 1) if layer - k >= 0 and c)
                     for layer in range(L))
    raise ConfigError(f"model.reflex={name!r} is unknown; use 'none', 'all', 'recent:c1,c2,...' "
                      "or a per-layer tuple of (source_layer, n_heads) pairs.")


def resolve_schedule(cfg) -> tuple[LayerPlan, ...]:
    schedule = _preset(cfg) if isinstance(cfg.reflex, str) else cfg.reflex
    if len(schedule) != cfg.n_layer:
        raise ConfigError(f"model.reflex has {len(schedule)} layer entries but n_layer="
                          f"{cfg.n_layer}; give exactly one tuple of (source, n_heads) per layer.")
    plans: list[LayerPlan] = []
    for layer, groups in enumerate(schedule):
        n_self = cfg.n_head - sum(c for _, c in groups)
        if n_self < 1:
            raise ConfigError(f"reflex schedule: layer {layer} gives {cfg.n_head - n_self} of its "
                              f"{cfg.n_head} heads to cross-attention and keeps {n_self} self heads; "
                              "every layer needs at least 1 self head.")
        cross = []
        for source, c in groups:
            if c < 1:
                raise ConfigError(f"reflex schedule: layer {layer} gives {c} heads to layer "
                                  f"{source}; head counts must be >= 1 (leave the pair out instead).")
            if not 0 <= source < layer:
                raise ConfigError(f"reflex schedule: layer {layer} reads from layer {source}, which "
                                  "is not an earlier layer; sources must be in 0..layer-1.")
            src_self = plans[source].n_self
            if c > src_self:
                raise ConfigError(f"reflex schedule: layer {layer} wants {c} heads of layer {source}, "
                                  f"which has only {src_self} self heads; lower the count.")
            # c heads aimed at layer j read j's *last* c self heads (docs/attention.md).
            cross.append(CrossGroup(source, c, tuple(range(src_self - c, src_self))))
        plans.append(LayerPlan(layer, n_self, tuple(cross)))
    return tuple(plans)
