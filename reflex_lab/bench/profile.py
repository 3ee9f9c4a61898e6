"""`bench.py --profile`: the step-time budget of this project's `all` and `none` train steps and
of its PyTorch peer (eager and torch.compile), per dtype, on the bench's model. The steps are
timed interleaved first (their medians are the walls the budgets split), then each is profiled.
`all` beside `none` says where the cross heads' time goes: the paired all/none ratio of the step
and of each part of the wall split (the decoder's forward + backward is where they differ)."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from ..machine import environment
from . import budget, wall_split
from .settings import BenchSettings
from .stats import fmt_ratio, paired_ratio
from .timing import interleaved, steady_median, steady_pairs
from .train import contenders


def profile(s: BenchSettings, log: Callable[[str], None] = print, with_torch: bool = True) -> dict:
    """{"settings", "env", "budgets": {"<contender> <dtype>": budget},
    "wall_split": {dtype: wall_split.wall_split(...)}, "step_ratios": {dtype: {contender: its
    step over `all`'s}}, "reflex_vs_vanilla": {dtype: {"step" | call of the wall split: all/none,
    paired}}, "notes"}."""
    tokens = np.random.default_rng(0).integers(0, s.vocab_size, (s.batch, s.block_size + 1)).astype(np.int32)
    out: dict = {"settings": dataclasses.asdict(s), "env": environment(), "budgets": {},
                 "wall_split": {}, "notes": []}
    for dtype in s.dtypes:
        cs = contenders(s, dtype, tokens, with_torch, out["notes"], log, schedules=("all", "none"),
                        documents=False)
        growth: dict = {}
        times = interleaved({k: c.step for k, c in cs.items()}, s.train_reps, log, warmup_rounds=2,
                            growth=growth)
        first = next(iter(cs))
        out.setdefault("step_ratios", {})[dtype] = {  # each contender's time over ours, paired
            name: paired_ratio(times[name], times[first], steady_pairs(growth[name], growth[first]))
            for name in cs if name != first}
        for name, c in cs.items():
            wall = steady_median(times[name], growth[name])
            log(f"## profiling {name} {dtype} (median step {wall:.3f} s)")
            if c.kind == "jax":
                b = budget.xla_budget(c.compiled, c.step, wall)
            else:
                b = budget.torch_budget(c.step, wall, c.cfg, s.batch * s.block_size)
            b["step_s_all"], b["heap_growth_all"] = times[name], growth[name]
            out["budgets"][f"{name} {dtype}"] = b
        log(f"## wall split {dtype}: step, gradients, decoder of every contender, interleaved")
        split = out["wall_split"][dtype] = wall_split.wall_split(cs, s.train_reps, log)
        out.setdefault("reflex_vs_vanilla", {})[dtype] = {
            "step": paired_ratio(times["jax all"], times["jax none"],
                                 steady_pairs(growth["jax all"], growth["jax none"])),
            **{call: paired_ratio(split["jax all"]["per_round"][call],
                                  split["jax none"]["per_round"][call])
               for call in ("gradients", "decoder")}}
    out["env"]["load_avg_end"] = os.getloadavg()[0]
    return out


def markdown(res: dict) -> str:
    """One table per dtype: seconds (share) of every category, contender by contender."""
    lines, by_dtype = [], {}
    for key, b in res["budgets"].items():
        name, dtype = key.rsplit(" ", 1)
        by_dtype.setdefault(dtype, {})[name] = b
    env = res["env"]
    lines.append(f"Step-time budget, {env['cpu']} ({' '.join(env.get('cpu_flags', []))}; "
                 f"{env['cores']} cores), {env['date']}, load {env['load_avg_start']:.2f}")
    for dtype, bs in by_dtype.items():
        names = list(bs)
        lines += ["", f"### {dtype}: time per step (share; GFLOP/s or GB/s)", "",
                  "| category | " + " | ".join(names) + " |",
                  "|---|" + "---:|" * len(names)]
        cats = [r["category"] for r in next(iter(bs.values()))["rows"]]
        for i, cat in enumerate(cats):
            cells = [_cell(bs[n]["rows"][i]) for n in names]
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")
        lines.append("| **step (median)** | " + " | ".join(f"**{bs[n]['wall_s']:.3f}**"
                                                         for n in names) + " |")
        ratios = res.get("step_ratios", {}).get(dtype, {})
        if ratios:
            lines.append("| step time over the first column's, paired [95%] | – | "
                         + " | ".join(fmt_ratio(ratios.get(n)) for n in names[1:]) + " |")
        if dtype in res.get("wall_split", {}):
            lines += wall_split.markdown(res["wall_split"][dtype], dtype)
        rv = res.get("reflex_vs_vanilla", {}).get(dtype)
        if rv:
            lines += ["", f"`all` / `none`, {dtype}, paired [95%]: step {fmt_ratio(rv['step'])}; "
                      f"forward + backward without the update {fmt_ratio(rv['gradients'])}; "
                      f"decoder forward + backward alone {fmt_ratio(rv['decoder'])}"]
    return "\n".join(lines)


def _cell(row: dict) -> str:
    s, share = row["seconds"], row["share"]
    rate = (f"; {row['gflop_per_s']:.0f} GFLOP/s" if row.get("gflop_per_s") else
            f"; {row['gb_per_s']:.1f} GB/s" if row.get("gb_per_s") else "")
    return f"{1e3 * s:.1f} ms ({100 * share:.0f}%{rate})"
