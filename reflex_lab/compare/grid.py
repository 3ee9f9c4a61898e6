"""The grid of a comparison: the command line's schedules, seeds and variants, and one `Run` (name,
group, config, run directory) per (variant, schedule, seed)."""
from __future__ import annotations

import copy
import dataclasses
import os
import re
from typing import Sequence

from ml_collections import ConfigDict

from reflex_jax.errors import ConfigError, UsageError
from reflex_jax.run_config import apply_override, model_config_from

# fields the grid sets itself; overriding them on the command line would be silently undone
GRID_FIELDS = {"model.head_plan": "--schedules", "model.reflex": "--schedules", "seed": "--seeds",
               "run_dir": "--runs_dir"}  # model.reflex: head_plan's old name


class CompareError(UsageError):
    """A user-fixable mistake in a comparison; the message is one sentence naming the fix."""


def parse_schedules(text: str) -> list[str]:
    """`none,all,recent:2,1` -> ['none', 'all', 'recent:2,1']: numbers after an entry ending in a
    number list (`recent:2`, `kv:8`, `fewer:recent:2`) belong to it. `;` also separates."""
    out: list[str] = []
    for part in re.split(r"[;,\s]+", text.strip()):
        if not part:
            continue
        if re.fullmatch(r"\d+(\+value_residual)?", part):
            if not out or not re.search(r":\d+(,\d+)*$", out[-1]):  # recent:2,1 / kv:8,7,6
                raise CompareError(f"--schedules {text!r}: the number {part} follows no 'recent:' "
                                   "schedule; write e.g. --schedules none,all,recent:2,1.")
            out[-1] += "," + part
        else:
            out.append(part)
    if not out:
        raise CompareError("--schedules is empty; give e.g. --schedules none,all,recent:2,1.")
    dups = sorted({s for s in out if out.count(s) > 1})
    if dups:
        raise CompareError(f"--schedules lists {', '.join(dups)} more than once; list each schedule once.")
    return out


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in re.split(r"[,\s]+", str(text).strip()):
        if not part:
            continue
        if not re.fullmatch(r"\d+", part):
            raise CompareError(f"--seeds {text!r}: {part!r} is not a non-negative integer; write e.g. "
                               "--seeds 0,1,2.")
        seeds.append(int(part))
    if not seeds:
        raise CompareError("--seeds is empty; give e.g. --seeds 0,1,2.")
    if len(set(seeds)) != len(seeds):
        raise CompareError(f"--seeds {text!r} repeats a seed; list each seed once.")
    return seeds


@dataclasses.dataclass(frozen=True)
class Variant:
    """A named set of config overrides applied on top of the shared config (e.g. init_from)."""
    name: str
    overrides: tuple[tuple[str, str], ...] = ()


def parse_variant(text: str) -> Variant:
    """`name:key=value;key=value` (overrides may be empty: `random:`)."""
    name, colon, rest = text.partition(":")
    if not colon or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise CompareError(f"--variant {text!r} must be NAME:key=value[;key=value...] with a NAME of "
                           "letters, digits, '_', '-' or '.' "
                           "(e.g. --variant pretrained:init_from=weights/x).")
    overrides = []
    for item in filter(None, (s.strip() for s in rest.split(";"))):
        key, eq, value = item.partition("=")
        key = key.strip().removeprefix("--config.").removeprefix("config.")
        if not eq or not key:
            raise CompareError(f"--variant {text!r}: {item!r} is not key=value (e.g. init_from=weights/x).")
        overrides.append((key, value.strip()))
    return Variant(name, tuple(overrides))


def schedule_slug(schedule: str) -> str:
    """A file-name-safe form of a schedule: 'recent:2,1' -> 'recent-2-1'."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", schedule).strip("-")


@dataclasses.dataclass
class Run:
    name: str           # run directory name
    group: str          # what the report averages over seeds
    schedule: str
    variant: str
    seed: int
    run_dir: str
    config: ConfigDict


def check_grid_overrides(overrides: Sequence[tuple[str, str]]) -> None:
    """`--config.<field>` overrides must leave the fields the grid sets per run alone."""
    for key, _ in overrides:
        if key in GRID_FIELDS:
            raise CompareError(f"--config.{key} is set per run by the grid; use {GRID_FIELDS[key]} "
                               "instead.")


def _check_variants(variants: Sequence[Variant]) -> None:
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise CompareError(f"--variant names {', '.join(names)} repeat; give each variant its own name.")
    for key, _ in [o for v in variants for o in v.overrides]:
        if key in GRID_FIELDS:
            raise CompareError(f"a --variant sets {key}, which the grid sets itself; use {GRID_FIELDS[key]}.")


# a schedule entry `<plan>+value_residual` runs the plan with model.value_residual=True (ResFormer),
# so that one grid (and one paired report) holds both
VALUE_RESIDUAL = "+value_residual"


def _with_schedule(config: ConfigDict, schedule: str) -> ConfigDict:
    """A copy of `config` running `schedule`, checked against the model's layers and heads."""
    c = copy.deepcopy(config)
    plan = schedule.removesuffix(VALUE_RESIDUAL)
    if plan != schedule:
        c.model.value_residual = True
    c.model.head_plan = plan
    try:
        model_config_from(c)
    except ConfigError as e:
        raise CompareError(f"schedule {schedule!r} does not fit this model "
                           f"({c.model.n_layer} layers x {c.model.n_head} heads): {e}") from None
    return c


def run_name(schedule: str, seed: int, variant: str = "") -> str:
    """The run directory name of (variant, schedule, seed) in a grid: 'recent-2-1-s0'."""
    slug = f"{schedule_slug(schedule)}-s{seed}"
    return f"{variant}-{slug}" if variant else slug


def plan_grid(config: ConfigDict, schedules: Sequence[str], seeds: Sequence[int], runs_dir: str,
              variants: Sequence[Variant] = ()) -> list[Run]:
    """One run per (variant, schedule, seed), each config validated (schedules fit the model)."""
    _check_variants(variants)
    runs = []
    for variant in variants or [Variant("")]:
        base = copy.deepcopy(config)
        for key, raw in variant.overrides:
            apply_override(base, key, raw)
        for schedule in schedules:
            c = _with_schedule(base, schedule)
            group = f"{variant.name} {schedule}" if variant.name else schedule
            for seed in seeds:
                rc = copy.deepcopy(c)
                rc.seed = int(seed)
                name = run_name(schedule, seed, variant.name)
                rc.run_dir = os.path.join(runs_dir, name)
                runs.append(Run(name, group, schedule, variant.name, int(seed), rc.run_dir, rc))
    return runs
