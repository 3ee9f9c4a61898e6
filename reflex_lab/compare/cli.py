"""The command line of a comparison (`python compare.py`, `reflex-compare`): plan the grid, train
what is not finished, write the report, print one line per group."""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Optional, Sequence

from reflex_jax.cli import quiet_start, user_errors_as_status
from reflex_jax.run_config import load_config, split_overrides

from .grid import (CompareError, Run, check_grid_overrides, parse_schedules, parse_seeds, parse_variant,
                   plan_grid)
from .report import fmt_stat, write_report
from .runs import grid_states, read_recorded, run_grid
from .stats import aggregate, collect

PROG = "compare.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,
        description="Train a grid of reflex schedules x seeds at equal data, steps, tokens and optimizer, "
                    "and write results.md/results.json/plots. Config fields: --config.<field>=<value>.")
    p.add_argument("--config", default="configs/tiny.py", help="config file (default configs/tiny.py)")
    p.add_argument("--schedules", default="none,all",
                   help="schedules to compare, e.g. none,all,recent:2,1 (default none,all)")
    p.add_argument("--seeds", default="0,1,2", help="seeds, e.g. 0,1,2 (default)")
    p.add_argument("--out", required=True, help="where results.md, results.json and the plots go")
    p.add_argument("--runs_dir", default="",
                   help="where the run directories go (default runs/compare/<basename of --out>)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:key=value[;key=value] overrides for one arm; repeat for more arms "
                        "(e.g. --variant pretrained:init_from=weights/x --variant random:)")
    p.add_argument("--controls", default="",
                   help="groups every other group is also paired against besides the first "
                        "(e.g. matched-KV controls: --controls 'kv:8,7,6,5,4,3;fewer:all')")
    p.add_argument("--title", default="", help="heading of results.md (default: the --out name)")
    p.add_argument("--report_only", action="store_true", help="do not train; report the runs on disk")
    p.add_argument("--plan", action="store_true", help="print each run and what would happen, then exit")
    p.add_argument("--recorded_from", default="",
                   help="the report directory whose recorded finished runs stand for run directories "
                        "that are gone (default --out; a driver training one run at a time into a "
                        "scratch --out points this at the full report)")
    p.add_argument("--retry_failed", action="store_true",
                   help="train again runs that failed before (e.g. a non-finite loss)")
    return p


def plan_from_args(args: argparse.Namespace, rest: Sequence[str]) -> list[Run]:
    """The grid the command line asks for: config file + overrides, schedules, seeds, variants."""
    overrides = split_overrides(rest)
    check_grid_overrides(overrides)
    config = load_config(args.config, overrides)
    schedules, seeds = parse_schedules(args.schedules), parse_seeds(args.seeds)
    variants = [parse_variant(v) for v in args.variant]
    runs_dir = args.runs_dir or os.path.join("runs", "compare", os.path.basename(os.path.normpath(args.out)))
    return plan_grid(config, schedules, seeds, runs_dir, variants)


def _print_plan(runs: Sequence[Run], recorded: dict) -> None:
    states = grid_states(runs, recorded)
    for run in runs:
        st = states[run.name]
        print(f"{run.name:28s} {st.kind:9s} {st.detail}  ({run.run_dir})")


def _compare(argv: list[str]) -> int:
    args, rest = build_parser().parse_known_args(argv)
    runs = plan_from_args(args, rest)
    # the finished runs an earlier report recorded stand for run directories that are gone
    recorded = read_recorded(args.recorded_from or args.out)
    if args.plan:
        _print_plan(runs, recorded)
        return 0
    from reflex_jax.train.run_lock import RunLock
    # one compare.py per --out: two would train the same runs and the last report would win
    with RunLock(args.out, lock_name="compare.lock", what="--out",
                 elsewhere="use another --out"):
        return _train_and_report(args, argv, runs, recorded)


def _train_and_report(args, argv: list[str], runs: Sequence[Run], recorded: dict) -> int:
    t0 = time.perf_counter()
    controls = _controls(args.controls, runs)
    outcome = {} if args.report_only else run_grid(runs, retry_failed=args.retry_failed, recorded=recorded)
    summaries = collect(runs, recorded)
    command = " ".join(["python compare.py"] + [_quote(a) for a in argv])
    results = write_report(args.out, runs, summaries, aggregate(summaries, also_against=controls),
                           command=command, title=args.title, outcome=outcome)
    print(f"\n{len(runs)} runs ({sum(s['status'] == 'finished' for s in summaries)} finished) in "
          f"{time.perf_counter() - t0:.0f} s; results: {os.path.join(args.out, 'results.md')}")
    for g in results["groups"]:
        em, bpb = g["final_exact_match"], g["final_val_bpb"]
        print(f"  {g['group']:24s} final val loss {fmt_stat(g['final_val_loss'])}"
              + (f"  bpb {fmt_stat(bpb)}" if bpb["n"] else "")
              + (f"  exact match {fmt_stat(em, 3)}" if em["n"] else ""))
    # like train.py: 75 when a run was stopped (SIGINT/SIGTERM) after saving; run again to resume
    return 75 if "stopped" in outcome.values() else 0


def _controls(text: str, runs: Sequence[Run]) -> list[str]:
    if not text.strip():
        return []
    groups = list(dict.fromkeys(r.group for r in runs))
    controls = parse_schedules(text)
    for c in controls:
        if c not in groups:
            raise CompareError(f"--controls names {c!r}, which is not a group of this grid "
                               f"({', '.join(groups)}); name one of them.")
    return controls


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the comparison; 0, or 2 after printing a user's mistake as `compare.py: error: ...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return user_errors_as_status(PROG, lambda: _compare(argv))


def _quote(word: str) -> str:
    return word if re.fullmatch(r"[\w.,:=/+-]+", word) else "'" + word.replace("'", "'\\''") + "'"


def run() -> None:
    """The `reflex-compare` console script: like `python compare.py`."""
    from reflex_jax.malloc_tuning import tune_malloc
    tune_malloc()  # restarts the process once with glibc malloc tunables (see reflex_jax/malloc_tuning.py)
    quiet_start()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
