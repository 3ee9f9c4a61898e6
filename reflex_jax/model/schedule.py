"""The head schedule: which earlier layers each layer borrows K/V from, with how many heads.

A schedule (a preset string or explicit per-layer tuples) resolves once, when the ModelConfig is
built, into one `LayerPlan` per layer; the rest of the code reads those plans and never re-derives
the rules. The rules themselves are in docs/attention.md. This module holds the plan types, the
schedule presets (`none`, `all`, `recent:`, `cla:`, `yoco`) and the validation of schedules;
model/plans.py adds the variants that change more than the schedule (GQA, `fewer:`, `sharev:`,
`route`).
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Optional

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class CrossGroup:
    """`n_heads` query heads of a layer that read K/V heads `source_heads` of layer `source`.

    `share="v"`: the heads use their own layer's K (one K head each, computed by the reading
    layer) and only the source's V. `mixture` (route): the (layer, K/V head) pairs whose K/V the
    heads mix with learned weights; `source`/`source_heads` are then the starting choice."""
    source: int
    n_heads: int
    source_heads: tuple[int, ...]
    share: str = "kv"
    mixture: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer's head split: self heads first, then cross groups in schedule order.

    `n_kv` is how many K/V heads the layer computes and exports (None: one per self head). With
    fewer K/V heads than self heads (GQA), self heads share them in contiguous groups
    (`self_kv_heads`). A layer with no self heads borrows every head and has no K/V projection."""
    layer: int
    n_self: int
    cross: tuple[CrossGroup, ...]
    n_kv: Optional[int] = None

    def __post_init__(self):
        if self.n_kv is None:
            object.__setattr__(self, "n_kv", self.n_self)

    @property
    def n_cross(self) -> int:
        return sum(g.n_heads for g in self.cross)

    @property
    def n_query(self) -> int:
        """Query heads (Q and output projection width): self heads plus cross heads."""
        return self.n_self + self.n_cross

    @property
    def n_own_k(self) -> int:
        """Cross heads that use this layer's own K (`share="v"` groups)."""
        return sum(g.n_heads for g in self.cross if g.share == "v")

    @property
    def n_k(self) -> int:
        """K heads computed and cached: the exported K/V heads, then the share-V cross heads' K."""
        return self.n_kv + self.n_own_k

    @property
    def n_v(self) -> int:
        """V heads computed and cached."""
        return self.n_kv

    @property
    def routed(self) -> bool:
        return any(g.mixture for g in self.cross)

    @property
    def self_kv_heads(self) -> tuple[int, ...]:
        """The own K/V head of each self head: n_kv contiguous groups, as even as possible, the
        larger groups first (8 heads on 3 K/V heads: 3, 3, 2)."""
        if not self.n_kv:
            return ()
        base, extra = divmod(self.n_self, self.n_kv)
        return tuple(j for j in range(self.n_kv) for _ in range(base + (j < extra)))

    @property
    def classic(self) -> bool:
        """True when the layer is the original contract: one own K/V head per self head, and
        cross heads that read both K and V of one source."""
        return self.n_kv == self.n_self and all(g.share == "kv" and not g.mixture
                                                for g in self.cross)

    def short(self) -> str:
        """`7+1` (self+cross); `8/4kv` (GQA), `0+8` (borrowing layer), `7+1v` (share V), `7+1r`
        (routed)."""
        text = f"{self.n_self}"
        if self.n_kv != self.n_self and self.n_self:
            text += f"/{self.n_kv}kv"
        if self.cross:
            text += f"+{self.n_cross}" + ("r" if self.routed else "") + ("v" if self.n_own_k else "")
        return text

    def describe(self) -> str:
        """`layer 2: 6 self; cross 1<-L1[heads 6], 1<-L0[heads 7]` and the variants' details."""
        if not self.n_self:
            own = "0 self (no K/V projection)"
        elif self.n_kv != self.n_self:
            sizes = [self.self_kv_heads.count(j) for j in range(self.n_kv)]
            own = f"{self.n_self} self on {self.n_kv} K/V heads (groups {','.join(map(str, sizes))})"
        else:
            own = f"{self.n_self} self"
        if self.routed:
            mix = ", ".join(f"L{src}[{h}]" for src, h in self.cross[0].mixture)
            starts = ", ".join(f"L{g.source}" for g in self.cross)
            groups = (f"{self.n_cross} routed over {mix} (starting at {starts})"
                      + ("; own K" if self.n_own_k else ""))
        else:
            groups = ", ".join(_describe_group(g) for g in self.cross)
        return f"layer {self.layer}: {own}" + (f"; cross {groups}" if groups else "")


def _describe_group(g: CrossGroup) -> str:
    heads = ",".join(map(str, g.source_heads))
    if g.share == "v":
        return f"{g.n_heads}<-L{g.source}[V heads {heads}; own K]"
    return f"{g.n_heads}<-L{g.source}[heads {heads}]"


Schedule = tuple[tuple[tuple[int, int], ...], ...]  # per layer: ((source, n_heads), ...)

SCHEDULE_EXAMPLE = "((), ((0, 1),), ((1, 1), (0, 1)))"  # 3 layers; shown in the errors
PRESET_NAMES = ("'none', 'all', 'recent:c1,c2,...', 'cla:G', 'yoco', 'gqa:G', 'kv:n0,n1,...', "
                "'route', 'fewer:<schedule>', 'sharev:<schedule>'")


def as_schedule_tuple(value) -> Schedule:
    try:
        return tuple(tuple((int(src), int(c)) for src, c in layer) for layer in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"model.head_plan={value!r} is neither a preset ({PRESET_NAMES}) nor a per-layer tuple of "
            f"(source_layer, n_heads) pairs such as {SCHEDULE_EXAMPLE!r}."
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
            f"model.head_plan={value!r} is not a valid per-layer schedule; write one tuple of "
            f"(source_layer, n_heads) pairs per layer, e.g. {SCHEDULE_EXAMPLE!r} for 3 layers."
        ) from None
    if isinstance(parsed, str):  # '("all")' is just a parenthesised preset name
        return parsed
    return as_schedule_tuple(parsed)


def _counts(name: str, prefix: str, example: str) -> list[int]:
    """The comma-separated non-negative integers after `prefix` (ConfigError if there are none)."""
    try:
        counts = [int(c) for c in name[len(prefix):].split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or any(c < 0 for c in counts):
        raise ConfigError(f"model.head_plan={name!r}: '{prefix}' needs non-negative head counts, "
                          f"e.g. '{example}'.")
    return counts


def _all(cfg) -> Schedule:
    L, H, window = cfg.n_layer, cfg.n_head, cfg.reflex_window
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


def _cross_layer(cfg, name: str) -> Schedule:
    """`cla:G`: in every run of G layers the first computes K/V and the others borrow all of its
    heads; `yoco`: the upper half of the layers borrows all heads of the lower half's last layer."""
    L, H = cfg.n_layer, cfg.n_head
    if name == "yoco":
        if L < 2:
            raise ConfigError("model.head_plan='yoco' needs n_layer >= 2 (a lower half to compute K/V "
                              "and an upper half to borrow them).")
        lower = (L + 1) // 2
        return tuple(() if layer < lower else ((lower - 1, H),) for layer in range(L))
    arg = name[len("cla:"):].strip()
    group = int(arg) if arg.isdigit() else 0
    if group < 2:
        raise ConfigError(f"model.head_plan={name!r}: 'cla:' takes one group size G >= 2 (layers per "
                          "shared K/V), e.g. 'cla:2'.")
    return tuple(() if layer % group == 0 else ((layer - layer % group, H),) for layer in range(L))


def preset_schedule(cfg, name: str) -> Schedule:
    """The schedule of a preset name (those that are plain schedules)."""
    L = cfg.n_layer
    name = name.strip()
    if name == "none":
        return tuple(() for _ in range(L))
    if name == "all":
        return _all(cfg)
    if name.startswith("recent:"):
        counts = _counts(name, "recent:", "recent:2,1")
        return tuple(tuple((layer - k, c) for k, c in enumerate(counts, 1) if layer - k >= 0 and c)
                     for layer in range(L))
    if name == "yoco" or name.startswith("cla:"):
        return _cross_layer(cfg, name)
    raise ConfigError(f"model.head_plan={name!r} is unknown; use {PRESET_NAMES} or a per-layer tuple "
                      "of (source_layer, n_heads) pairs.")


def _check_group(layer: int, source: int, c: int, plans: list[LayerPlan]) -> None:
    if c < 1:
        raise ConfigError(f"reflex schedule: layer {layer} gives {c} heads to layer "
                          f"{source}; head counts must be >= 1 (leave the pair out instead).")
    if not 0 <= source < layer:
        raise ConfigError(f"reflex schedule: layer {layer} reads from layer {source}, which "
                          "is not an earlier layer; sources must be in 0..layer-1.")
    if plans[source].n_kv == 0:
        raise ConfigError(f"reflex schedule: layer {layer} reads from layer {source}, which borrows "
                          "all its heads and computes no K/V; a borrowing layer cannot be a source, "
                          "so aim the group at a layer with self heads.")
    if c > plans[source].n_kv:
        raise ConfigError(f"reflex schedule: layer {layer} wants {c} heads of layer {source}, "
                          f"which has only {plans[source].n_kv} self heads; lower the count.")


def resolve_schedule(cfg, schedule=None) -> tuple[LayerPlan, ...]:
    """The plans of `schedule` (a preset name or tuples; default `cfg.head_plan`), validated.

    A layer that gives all its heads to cross groups is a borrowing layer: no self heads, no K/V
    projection, and it cannot be a source."""
    schedule = cfg.head_plan if schedule is None else schedule
    if isinstance(schedule, str):
        schedule = preset_schedule(cfg, schedule)
    if len(schedule) != cfg.n_layer:
        raise ConfigError(f"model.head_plan has {len(schedule)} layer entries but n_layer="
                          f"{cfg.n_layer}; give exactly one tuple of (source, n_heads) per layer.")
    plans: list[LayerPlan] = []
    for layer, groups in enumerate(schedule):
        n_self = cfg.n_head - sum(c for _, c in groups)
        if n_self < 0:
            raise ConfigError(f"reflex schedule: layer {layer} gives {cfg.n_head - n_self} of its "
                              f"{cfg.n_head} heads to cross-attention and keeps {n_self} self heads; "
                              f"a layer can give at most its {cfg.n_head} heads.")
        cross = []
        for source, c in groups:
            _check_group(layer, source, c, plans)
            src_kv = plans[source].n_kv
            # c heads aimed at layer j read j's *last* c self heads (docs/attention.md).
            cross.append(CrossGroup(source, c, tuple(range(src_kv - c, src_kv))))
        plans.append(LayerPlan(layer, n_self, tuple(cross)))
    return tuple(plans)
