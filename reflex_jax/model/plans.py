"""The head plan of every `model.head_plan` value: the schedules of model/schedule.py and the variants
that change more than which layer a head reads (docs/attention.md#head-plans):

* `gqa:G`, `kv:n0,n1,...`: every head is a self head, and self heads share K/V heads in groups;
* `route`: the head split of `all`, each cross head reading a learned mixture of the earlier
  layers' exported K/V (the weights are model/route.py);
* `fewer:<schedule>`: the schedule's self heads only (its cross heads dropped);
* `sharev:<schedule>`: the schedule's cross heads keep their own K and borrow only V.

`resolve_plans` is what `ModelConfig.layers` calls; it also checks `value_residual` against the plan.
"""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError
from .schedule import LayerPlan, parse_schedule, resolve_schedule

PREFIXES = ("fewer", "sharev")


def resolve_plans(cfg) -> tuple[LayerPlan, ...]:
    plans = _resolve(cfg, cfg.head_plan)
    if cfg.value_residual:
        _check_value_residual(plans)
    return plans


def _resolve(cfg, value) -> tuple[LayerPlan, ...]:
    if not isinstance(value, str):
        return resolve_schedule(cfg, value)
    name = value.strip()
    kind, _, arg = name.partition(":")
    if kind in PREFIXES:
        if not arg.strip():
            raise ConfigError(f"model.head_plan={name!r}: '{kind}:' needs a schedule after it, e.g. "
                              f"'{kind}:all'.")
        base = _resolve(cfg, parse_schedule(arg))
        return _fewer(name, base) if kind == "fewer" else _share_v(name, base)
    if kind == "gqa":
        return _grouped(cfg, [_gqa_kv_heads(cfg, name, arg)] * cfg.n_layer)
    if kind == "kv":
        return _grouped(cfg, _kv_counts(cfg, name, arg))
    if name == "route":
        return _route(resolve_schedule(cfg, "all"))
    return resolve_schedule(cfg, name)


def _gqa_kv_heads(cfg, name: str, arg: str) -> int:
    group = int(arg) if arg.strip().isdigit() else 0
    if group < 1 or cfg.n_head % group:
        raise ConfigError(f"model.head_plan={name!r}: 'gqa:G' needs G >= 1 query heads per K/V head "
                          f"with G dividing n_head={cfg.n_head}, e.g. 'gqa:2' (gqa:{cfg.n_head} "
                          "is multi-query attention).")
    return cfg.n_head // group


def _kv_counts(cfg, name: str, arg: str) -> list[int]:
    try:
        counts = [int(c) for c in arg.split(",")]
    except ValueError:
        counts = []
    if len(counts) != cfg.n_layer or any(not 1 <= c <= cfg.n_head for c in counts):
        raise ConfigError(f"model.head_plan={name!r}: 'kv:' needs one K/V head count per layer "
                          f"({cfg.n_layer} numbers, each in 1..{cfg.n_head}), e.g. "
                          f"'kv:{','.join([str(cfg.n_head)] * cfg.n_layer)}'.")
    return counts


def _grouped(cfg, kv_heads: list[int]) -> tuple[LayerPlan, ...]:
    """Every head a self head; layer l computes kv_heads[l] K/V heads shared in groups."""
    return tuple(LayerPlan(layer, cfg.n_head, (), n_kv) for layer, n_kv in enumerate(kv_heads))


def _route(base: tuple[LayerPlan, ...]) -> tuple[LayerPlan, ...]:
    """`all`'s split; each cross head mixes the K/V that every source of its layer exports (the
    source's last self head), starting from `all`'s choice."""
    plans = []
    for plan in base:
        mixture = tuple((g.source, g.source_heads[-1]) for g in plan.cross)
        cross = tuple(dataclasses.replace(g, mixture=mixture) for g in plan.cross)
        plans.append(dataclasses.replace(plan, cross=cross))
    return tuple(plans)


def _fewer(name: str, base: tuple[LayerPlan, ...]) -> tuple[LayerPlan, ...]:
    """The control that drops the cross heads: each layer keeps its self heads and K/V only."""
    for plan in base:
        if not plan.n_self:
            raise ConfigError(f"model.head_plan={name!r}: layer {plan.layer} borrows all its heads, so "
                              "without its cross heads it would have no query heads; 'fewer:' needs "
                              "a schedule in which every layer keeps a self head.")
    return tuple(LayerPlan(p.layer, p.n_self, (), p.n_kv) for p in base)


def _share_v(name: str, base: tuple[LayerPlan, ...]) -> tuple[LayerPlan, ...]:
    """Every cross head computes its own K and borrows only its source's V."""
    if not any(p.cross for p in base):
        raise ConfigError(f"model.head_plan={name!r}: the schedule has no cross heads, so there is no V "
                          "to share; put a schedule with cross heads after 'sharev:', e.g. "
                          "'sharev:all'.")
    return tuple(dataclasses.replace(p, cross=tuple(dataclasses.replace(g, share="v")
                                                    for g in p.cross)) for p in base)


def _check_value_residual(plans: tuple[LayerPlan, ...]) -> None:
    """Layer l's V head i is mixed with layer 0's V head i, so no layer may have more V heads."""
    first = plans[0].n_v
    for plan in plans[1:]:
        if plan.n_v > first:
            raise ConfigError(f"model.value_residual: layer {plan.layer} has {plan.n_v} V heads but "
                              f"layer 0 only {first}, and V head i mixes with layer 0's V head i; "
                              "give layer 0 at least as many K/V heads or turn value_residual off.")
