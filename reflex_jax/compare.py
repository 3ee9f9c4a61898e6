"""Compare reflex schedules (and other config variants) over seeds at equal data, steps, tokens and
optimizer, and report what the numbers say.

    python compare.py --config configs/tiny.py --schedules none,all,recent:2,1 --seeds 0,1,2 \
        --config.max_steps=300 --out experiments/tiny_arith

Every run of the grid is `<runs_dir>/<run name>` (default `runs/compare/<basename of out>/`; run names
are `<schedule>-s<seed>`, or `<variant>-<schedule>-s<seed>` with `--variant`). Runs train in this
process, one after the other, with the trainer of `train.py`. All runs share the config file and its
overrides; only `model.reflex`, `seed`, `run_dir` and the variant's overrides differ, so every run of a
seed sees the same batches (the batch at step s is a pure function of (seed, s), and built-in task
data is generated from the seed).

Resumable: a run whose metrics reached `max_steps` (with its final checkpoint, if it wrote
checkpoints) is not trained again; a run that stopped half-way resumes from its latest checkpoint; a
run directory trained with a different config is an error, never silently mixed in.

`<out>/results.md`, `<out>/results.json` and PNG plots hold the results: mean ± sample std over
seeds of the final and best validation loss, the final exact match (built-in tasks), tokens/s,
parameters and KV-cache bytes per token; runs that did not finish are listed as such and left out
of the means.
"""
from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import datetime
import difflib
import importlib.util
import json
import math
import os
import re
import statistics
import sys
import time
from typing import Any, Callable, Iterable, Optional, Sequence

from ml_collections import ConfigDict

RUN_MARKER = "compare_run.json"  # per run dir: wall time, trained-by-compare bookkeeping, failures
# config fields that do not change what a run computes (they may differ between a run and the grid)
IGNORED_FIELDS = ("run_dir", "async_checkpoints", "tensorboard", "wandb", "keep_checkpoints",
                  "checkpoint_interval", "log_interval")
# fields the grid sets itself; overriding them on the command line would be silently undone
GRID_FIELDS = {"model.reflex": "--schedules", "seed": "--seeds", "run_dir": "--runs_dir"}


class CompareError(ValueError):
    """A user-fixable mistake in a comparison; the message is one sentence naming the fix."""


# ---- config file + `--config.a.b=v` overrides ------------------------------------------------------

def load_config(path: str, overrides: Sequence[tuple[str, str]] = ()) -> ConfigDict:
    """`get_config()` of an ml_collections config file, with `(dotted.key, raw value)` overrides
    applied and type-checked against the file's fields."""
    file, _, arg = path.partition(":")
    if not file:
        raise CompareError("no config file given; pass --config configs/tiny.py (or another file "
                           "with get_config()).")
    if not os.path.isfile(file):
        raise CompareError(f"config file {file!r} does not exist; pass --config with an existing file "
                           "such as configs/tiny.py.")
    spec = importlib.util.spec_from_file_location(f"_compare_config_{abs(hash(file))}", file)
    module = importlib.util.module_from_spec(spec)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:  # config files import reflex_jax.defaults
        sys.path.insert(0, root)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file; name it and the error
        raise CompareError(f"config file {file!r} failed to load ({type(e).__name__}: {e}); fix "
                           "the file.") from None
    if not hasattr(module, "get_config"):
        raise CompareError(f"config file {file!r} has no get_config() function; config files "
                           "define get_config() returning an ml_collections ConfigDict.")
    config = module.get_config(arg) if arg else module.get_config()
    for key, raw in overrides:
        apply_override(config, key, raw)
    return config


def split_overrides(args: Sequence[str]) -> list[tuple[str, str]]:
    """`--config.a.b=v` / `--config.a.b v` command-line words -> [("a.b", "v")]; anything else is
    a mistake named in one sentence."""
    out, i = [], 0
    while i < len(args):
        word = args[i]
        if not word.startswith("--config."):
            raise CompareError(f"unknown argument {word!r}; config fields are set with "
                               "--config.<field>=<value> (e.g. --config.max_steps=300).")
        key, eq, value = word[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise CompareError(f"{word} has no value; write {word}=<value>.")
            value, i = args[i + 1], i + 1
        out.append((key, value))
        i += 1
    return out


def _field(config: ConfigDict, key: str):
    """(parent ConfigDict, leaf name) of a dotted key, with a did-you-mean for typos."""
    *path, leaf = key.split(".")
    node, walked = config, []
    for part in path + [leaf]:
        if not isinstance(node, ConfigDict) or part not in node:
            known = list(node.keys()) if isinstance(node, ConfigDict) else []
            close = difflib.get_close_matches(part, known, n=1)
            where = ".".join(walked) or "the config"
            hint = f"; did you mean '{'.'.join(walked + [close[0]])}'?" if close else (
                f"; {where} has {', '.join(known)}." if known else ".")
            raise CompareError(f"unknown config field '{key}'{hint}")
        parent, node = node, node[part]
        walked.append(part)
    return parent, leaf


def apply_override(config: ConfigDict, key: str, raw: str) -> None:
    parent, leaf = _field(config, key)
    if isinstance(parent[leaf], ConfigDict):
        raise CompareError(f"config field '{key}' is a group, not a value; set one of its fields, "
                           f"e.g. --config.{key}.{next(iter(parent[leaf].keys()), 'x')}=...")
    kind = parent.get_type(leaf)
    parent[leaf] = _parse_value(key, raw, kind)


def _parse_value(key: str, raw: str, kind) -> Any:
    raw = str(raw)
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
        if kind is str:
            return raw
        if kind in (tuple, list):
            value = ast.literal_eval(raw)
            if not isinstance(value, (tuple, list)):
                raise ValueError
            return kind(value)
    except (ValueError, SyntaxError):
        raise CompareError(f"config field '{key}' takes a {kind.__name__}, got {raw!r}.") from None
    try:  # a field whose default is None: a Python literal if it is one, else the string
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


# ---- the grid ------------------------------------------------------------------------------------

def parse_schedules(text: str) -> list[str]:
    """`none,all,recent:2,1` -> ['none', 'all', 'recent:2,1']: numbers after a `recent:` entry belong
    to it. `;` also separates."""
    out: list[str] = []
    for part in re.split(r"[;,\s]+", text.strip()):
        if not part:
            continue
        if re.fullmatch(r"\d+", part):
            if not out or not out[-1].startswith("recent:"):
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
                           "letters, digits, '_', '-' or '.' (e.g. --variant pretrained:init_from=weights/x).")
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


def plan_grid(config: ConfigDict, schedules: Sequence[str], seeds: Sequence[int], runs_dir: str,
              variants: Sequence[Variant] = ()) -> list[Run]:
    """One run per (variant, schedule, seed), each config validated (schedules fit the model)."""
    from .config import ConfigError
    from .defaults import model_config_from

    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise CompareError(f"--variant names {', '.join(names)} repeat; give each variant its own name.")
    for key, _ in [o for v in variants for o in v.overrides]:
        if key in GRID_FIELDS:
            raise CompareError(f"a --variant sets {key}, which the grid sets itself; use {GRID_FIELDS[key]}.")
    runs = []
    for variant in variants or [Variant("")]:
        base = copy.deepcopy(config)
        for key, raw in variant.overrides:
            apply_override(base, key, raw)
        for schedule in schedules:
            c = copy.deepcopy(base)
            c.model.reflex = schedule
            try:
                model_config_from(c)
            except ConfigError as e:
                raise CompareError(f"schedule {schedule!r} does not fit this model "
                                   f"({c.model.n_layer} layers x {c.model.n_head} heads): {e}") from None
            for seed in seeds:
                rc = copy.deepcopy(c)
                rc.seed = int(seed)
                slug = schedule_slug(schedule)
                name = f"{variant.name}-{slug}-s{seed}" if variant.name else f"{slug}-s{seed}"
                rc.run_dir = os.path.join(runs_dir, name)
                group = f"{variant.name} {schedule}" if variant.name else schedule
                runs.append(Run(name, group, schedule, variant.name, int(seed), rc.run_dir, rc))
    return runs


# ---- run state: what is on disk, and what to do with it -----------------------------------------------

@dataclasses.dataclass
class RunState:
    kind: str                 # new | partial | finished | failed
    step: int = 0             # last step logged in metrics.jsonl
    detail: str = ""


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    # a resumed run rewrites the steps after its checkpoint; keep the last row of each step
    by_step = {int(r["step"]): r for r in rows}
    return [by_step[s] for s in sorted(by_step)]


def _flatten(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _normalised(config_dict: dict) -> dict:
    flat = _flatten(json.loads(json.dumps(config_dict, default=str)))
    return {k: v for k, v in flat.items() if k.split(".")[0] not in IGNORED_FIELDS}


def config_difference(stored: dict, wanted: dict) -> Optional[str]:
    """'max_steps=100 there, 200 here' for the first field that differs, or None."""
    a, b = _normalised(stored), _normalised(wanted)
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            return f"{key}={a.get(key, '<absent>')!r} there, {b.get(key, '<absent>')!r} here"
    return None


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def run_state(run_dir: str, config: ConfigDict) -> RunState:
    """What the grid should do with `run_dir`: train it (new), resume it (partial), reuse it
    (finished), or leave it (failed: a recorded training failure such as a non-finite loss).

    Finished means metrics.jsonl reached max_steps and, if the run wrote checkpoints, the final step's
    checkpoint exists (a run killed while saving it resumes instead). A run directory written with a
    different config raises CompareError: its numbers would not belong to this grid.
    """
    max_steps = int(config.max_steps)
    stored = _read_json(os.path.join(run_dir, "config.json"))
    if stored is not None:
        diff = config_difference(stored, config.to_dict())
        if diff:
            raise CompareError(f"run directory {run_dir!r} was trained with a different config "
                               f"({diff}); use another --out/--runs_dir or delete that directory.")
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    step = int(rows[-1]["step"]) if rows else 0
    marker = _read_json(os.path.join(run_dir, RUN_MARKER)) or {}
    if marker.get("error") and step < max_steps:
        return RunState("failed", step, marker["error"])
    if step >= max_steps:
        ckpt_dir = os.path.join(run_dir, "checkpoints")
        if os.path.isdir(ckpt_dir) and not os.path.isdir(os.path.join(ckpt_dir, str(max_steps))):
            return RunState("partial", step, f"no checkpoint of step {max_steps} yet")
        return RunState("finished", step)
    if step > 0 or os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return RunState("partial", step, f"step {step} of {max_steps}")
    return RunState("new", 0)


# ---- training the grid ---------------------------------------------------------------------------

def train_run(run: Run, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) one run in this process; record its wall time in the run directory.
    Config mistakes raise CompareError; a failure during training (a non-finite loss) is recorded
    and returned as {'error': ...} so the rest of the grid still runs."""
    from .trainer import USER_ERRORS, Trainer

    marker_path = os.path.join(run.run_dir, RUN_MARKER)
    marker = _read_json(marker_path) or {}
    t0 = time.perf_counter()
    try:
        trainer = Trainer(run.config, log=log)
    except USER_ERRORS as e:
        raise CompareError(f"run {run.name}: {e}") from None
    error, summary = None, {}
    try:
        summary = trainer.train()
    except USER_ERRORS as e:
        error = str(e)
    wall = time.perf_counter() - t0
    marker = {"wall_s": marker.get("wall_s", 0.0) + wall, "sessions": marker.get("sessions", 0) + 1,
              "updated": _now()}
    if error:
        marker["error"] = error
    os.makedirs(run.run_dir, exist_ok=True)
    with open(marker_path, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)
    del trainer
    return {"error": error} if error else summary


def run_grid(runs: Sequence[Run], *, retry_failed: bool = False,
             log: Callable[[str], None] = print) -> dict[str, str]:
    """Train what is not finished; returns {run name: 'trained' | 'resumed' | 'reused' | 'failed' |
    'stopped'}. A run stopped by SIGINT/SIGTERM stops the grid (the report is still written)."""
    # check every run directory before any training: a config mismatch found after an hour is worse
    states = {r.name: run_state(r.run_dir, r.config) for r in runs}
    outcome: dict[str, str] = {}
    for i, run in enumerate(runs, 1):
        st = states[run.name]
        head = f"[{i}/{len(runs)}] {run.name}"
        if st.kind == "finished":
            log(f"{head}: finished before (step {st.step}), reused")
            outcome[run.name] = "reused"
            continue
        if st.kind == "failed" and not retry_failed:
            log(f"{head}: failed before ({st.detail}); not retried (pass --retry_failed to retry)")
            outcome[run.name] = "failed"
            continue
        if st.kind == "failed":
            os.remove(os.path.join(run.run_dir, RUN_MARKER))
        log(f"{head}: " + ("training" if st.kind == "new" else f"resuming ({st.detail})"))
        result = train_run(run, log=log)
        if result.get("error"):
            log(f"{head}: failed: {result['error']}")
            outcome[run.name] = "failed"
        elif result.get("stopped_by"):
            log(f"{head}: stopped by {result['stopped_by']} at step {result['final_step']}; "
                "the grid stops here (run the same command again to resume)")
            outcome[run.name] = "stopped"
            break
        else:
            outcome[run.name] = "trained" if st.kind == "new" else "resumed"
    return outcome


# ---- aggregation -----------------------------------------------------------------------------------

def summarize_run(rows: Sequence[dict], max_steps: int) -> dict:
    """Final/best validation numbers, exact match and throughput of one run's metric rows."""
    step = int(rows[-1]["step"]) if rows else 0
    evals = [r for r in rows if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
    out: dict[str, Any] = {"step": step, "max_steps": int(max_steps), "finished": step >= max_steps,
                           "eval_rows": len(evals)}
    out["final_loss"] = float(rows[-1]["loss"]) if rows and "loss" in rows[-1] else None
    out["tokens"] = int(rows[-1]["tokens"]) if rows and "tokens" in rows[-1] else None
    if evals:
        best = min(evals, key=lambda r: r["val_loss"])
        out.update(final_val_loss=float(evals[-1]["val_loss"]), final_val_step=int(evals[-1]["step"]),
                   best_val_loss=float(best["val_loss"]), best_val_step=int(best["step"]))
    else:
        out.update(final_val_loss=None, final_val_step=None, best_val_loss=None, best_val_step=None)
    em = [r for r in rows if r.get("exact_match") is not None]
    out["final_exact_match"] = float(em[-1]["exact_match"]) if em else None
    out["best_exact_match"] = max(float(r["exact_match"]) for r in em) if em else None
    # throughput: training-only log intervals (not the first, which compiles; not eval rows, whose
    # interval includes the evaluation); the median resists the odd slow interval on a shared box
    steady = [r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r and r.get("val_loss") is None]
    if not steady:
        steady = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    out["tokens_per_s"] = float(statistics.median(steady)) if steady else None
    return out


def mean_std(values: Iterable[Optional[float]]) -> dict:
    """{'mean', 'std' (sample std, ddof=1; None for fewer than 2 values), 'n'} over non-None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}


METRICS = ("final_val_loss", "best_val_loss", "final_exact_match", "best_exact_match", "final_loss",
           "tokens_per_s", "wall_s")


def model_facts(config: ConfigDict) -> dict:
    """Parameters, K/V heads and KV-cache bytes per token of a config's model (no weights allocated)."""
    import jax
    import numpy as np

    from .defaults import model_config_from
    from .model import count_params, init_params

    cfg = model_config_from(config)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    itemsize = np.dtype(cfg.compute_dtype).itemsize
    return {"params": count_params(shapes), "kv_heads": cfg.kv_heads_total,
            "kv_heads_vanilla": cfg.n_layer * cfg.n_head,
            "kv_bytes_per_token": kv_bytes_per_token(cfg), "kv_dtype": np.dtype(cfg.compute_dtype).name,
            "layout": cfg.schedule_table(), "itemsize": itemsize}


def kv_bytes_per_token(cfg) -> int:
    """K and V of every self head of every layer, one token: 2 * sum_l n_self(l) * head_dim * bytes."""
    import numpy as np
    return 2 * cfg.kv_heads_total * cfg.head_dim * np.dtype(cfg.compute_dtype).itemsize


def collect(runs: Sequence[Run]) -> list[dict]:
    """One summary per run of the grid (status 'missing' when it has no metrics)."""
    out = []
    for run in runs:
        rows = read_metrics(os.path.join(run.run_dir, "metrics.jsonl"))
        s = summarize_run(rows, int(run.config.max_steps))
        marker = _read_json(os.path.join(run.run_dir, RUN_MARKER)) or {}
        s.update(name=run.name, group=run.group, schedule=run.schedule, variant=run.variant,
                 seed=run.seed, run_dir=run.run_dir, wall_s=marker.get("wall_s"))
        if not rows:
            s["status"] = "missing"
        elif s["finished"]:
            s["status"] = "finished"
        else:
            s["status"] = f"unfinished (step {s['step']} of {s['max_steps']})"
        if marker.get("error") and not s["finished"]:
            s["status"] = f"failed at step {s['step']}: {marker['error']}"
        out.append(s)
    return out


def aggregate(summaries: Sequence[dict], baseline: Optional[str] = None) -> list[dict]:
    """Per group (in first-seen order): mean ± std over the finished runs of every metric, and the
    final val loss difference to `baseline` (default: the first group) paired by seed."""
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(s["group"], []).append(s)
    baseline = baseline or (next(iter(groups)) if groups else None)
    base_by_seed = {s["seed"]: s for s in groups.get(baseline, []) if s["status"] == "finished"}
    out = []
    for name, members in groups.items():
        done = [s for s in members if s["status"] == "finished"]
        g = {"group": name, "schedule": members[0]["schedule"], "variant": members[0]["variant"],
             "runs": len(members), "finished": len(done), "seeds": [s["seed"] for s in done],
             "not_finished": {s["name"]: s["status"] for s in members if s["status"] != "finished"}}
        for m in METRICS:
            g[m] = mean_std(s.get(m) for s in done)
        if name != baseline:
            diffs = [s["final_val_loss"] - base_by_seed[s["seed"]]["final_val_loss"] for s in done
                     if s["seed"] in base_by_seed and s["final_val_loss"] is not None
                     and base_by_seed[s["seed"]]["final_val_loss"] is not None]
            g["delta_final_val_loss"] = mean_std(diffs)
            g["delta_vs"] = baseline
        out.append(g)
    return out


# ---- report --------------------------------------------------------------------------------------

def _fmt(stat: Optional[dict], digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "—"
    fmt = f"{{:{'+' if sign else ''}.{digits}f}}"
    text = fmt.format(stat["mean"] * scale)
    if stat.get("std") is not None:
        text += f" ± {stat['std'] * scale:.{digits}f}"
    return text


def _fmt_int(n: Optional[float]) -> str:
    return "—" if n is None else f"{int(round(n)):,}"


def setup_facts(config: ConfigDict) -> dict:
    c = config
    tokens_per_step = int(c.batch_size) * int(c.model.block_size)
    data = (f"built-in task `{c.data.task}` ({_task_option_text(c)}, {c.data.tokenizer} tokenizer, "
            f"{c.data.task_rows} train rows, {c.data.task_val_rows} val rows)") if c.data.task else \
        f"prepared directory `{c.data.dir}`"
    m = c.model
    return {"data": data, "loss_on": c.data.loss_on,
            "model": f"{m.n_layer} layers x {m.n_head} heads, n_embd {m.n_embd}, block {m.block_size}, "
                     f"vocab {m.vocab_size}, {m.norm}, {m.mlp}, {m.pos_emb} positions, dropout {m.dropout}, "
                     f"{m.dtype}",
            "steps": int(c.max_steps), "batch_size": int(c.batch_size), "grad_accum": int(c.grad_accum),
            "tokens_per_step": tokens_per_step, "tokens_per_run": tokens_per_step * int(c.max_steps),
            "optimizer": f"AdamW lr {c.optim.lr:g} -> {c.optim.min_lr:g} (warmup {c.optim.warmup_steps}, "
                         f"cosine), betas {c.optim.b1:g}/{c.optim.b2:g}, wd {c.optim.weight_decay:g}, "
                         f"clip {c.optim.clip:g}",
            "eval": f"every {c.eval_interval} steps on {c.eval_batches} val batches"
                    + (f", exact match on {c.eval_exact_match} held-out questions"
                       if c.data.task and c.eval_exact_match else ""),
            "init_from": c.init_from or None}


def _task_option_text(c: ConfigDict) -> str:
    from .tasks import get_task
    known = get_task(c.data.task).defaults
    return ", ".join(f"{k}={c.data.task_options[k]}" for k in known if k in c.data.task_options)


def write_report(out_dir: str, runs: Sequence[Run], summaries: Sequence[dict], groups: Sequence[dict],
                 *, command: str = "", title: str = "", outcome: Optional[dict] = None) -> dict:
    """results.json, results.md and the plots in `out_dir`; returns the results dict."""
    os.makedirs(out_dir, exist_ok=True)
    facts = {}
    for run in runs:  # per group: params and KV bytes of its model (same for every seed)
        if run.group not in facts:
            facts[run.group] = model_facts(run.config)
    for g in groups:
        g.update(facts[g["group"]])
    base = runs[0].config
    setup = setup_facts(base)
    variants = variant_differences(runs)
    if any("init_from" in diff for diff in variants.values()):
        setup["init_from"] = None  # per variant, listed with the variants
    plots = plot_curves(out_dir, runs, summaries)
    results = {"title": title or os.path.basename(os.path.normpath(out_dir)), "created": _now(),
               "command": command, "setup": setup, "variants": variants, "groups": groups,
               "runs": list(summaries), "plots": plots, "outcome": outcome or {}}
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write(render_markdown(results))
    return results


def variant_differences(runs: Sequence[Run]) -> dict:
    """{variant: {field: value}} for the config fields in which the variants differ from each other
    (schedule, seed and run_dir aside)."""
    first: dict[str, dict] = {}
    for run in runs:
        if run.variant and run.variant not in first:
            first[run.variant] = _flatten(run.config.to_dict())
    skip = {"run_dir", "seed", "model.reflex"}
    keys = sorted({k for flat in first.values() for k in flat if k not in skip
                   and len({json.dumps(f.get(k), default=str) for f in first.values()}) > 1})
    return {name: {k: flat.get(k) for k in keys} for name, flat in first.items()}


def render_markdown(results: dict) -> str:
    s, groups = results["setup"], results["groups"]
    has_em = any(g["final_exact_match"]["n"] for g in groups)
    baseline = next((g["delta_vs"] for g in groups if "delta_vs" in g), None)
    lines = [f"# {results['title']}", "",
             f"Generated {results['created']} by `{results['command'] or 'reflex_jax.compare'}`.", "",
             f"* Model: {s['model']}", f"* Data: {s['data']}; loss on {s['loss_on']} tokens",
             f"* Training: {s['steps']} steps x {s['batch_size']} sequences x {s['tokens_per_step'] // s['batch_size']}"
             f" tokens = {s['tokens_per_run']:,} tokens per run; {s['optimizer']}",
             f"* Evaluation: {s['eval']}"]
    if s.get("init_from"):
        lines.append(f"* Init from: `{s['init_from']}`")
    for name, diff in results.get("variants", {}).items():
        lines.append(f"* Variant `{name}`: " + (", ".join(f"`{k}={v!r}`" for k, v in diff.items()) or
                                                 "the shared config"))
    lines += ["", "Mean ± sample std over the finished seeds (one value: one seed). "
              + (f"Δ is the final val loss minus `{baseline}`'s, paired by seed (same data and batches). "
                 if baseline else "")
              + "tokens/s is the median training-only log interval of a run (shared 2-core machine: noisy).",
              ""]
    head = ["group", "layout (self+cross heads per layer)", "seeds", "final val loss", "best val loss"]
    if baseline:
        head.append(f"Δ final vs {baseline}")
    if has_em:
        head += ["final exact match", "best exact match"]
    head += ["tokens/s", "params", "KV heads", "KV bytes/token", "wall/run"]
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for g in groups:
        layout = g["layout"].split(": ", 1)[-1].replace(" | ", " / ")  # '|' would split the cell
        seeds = f"{g['finished']}/{g['runs']}" + (f" ({', '.join(map(str, g['seeds']))})" if g["seeds"] else "")
        row = [f"`{g['group']}`", layout, seeds, _fmt(g["final_val_loss"]), _fmt(g["best_val_loss"])]
        if baseline:
            row.append("(baseline)" if "delta_vs" not in g else _fmt(g["delta_final_val_loss"], sign=True))
        if has_em:
            row += [_fmt(g["final_exact_match"], 1, 100.0) + ("%" if g["final_exact_match"]["n"] else ""),
                    _fmt(g["best_exact_match"], 1, 100.0) + ("%" if g["best_exact_match"]["n"] else "")]
        wall = g["wall_s"]["mean"]
        row += [_fmt_int(g["tokens_per_s"]["mean"]), _fmt_int(g["params"]),
                f"{g['kv_heads']}/{g['kv_heads_vanilla']}",
                f"{g['kv_bytes_per_token']:,} ({g['kv_dtype']})", "—" if wall is None else f"{wall:.0f} s"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Runs", "", "| run | seed | status | final val loss (step) | best val loss (step) |"
              + (" final exact match |" if has_em else "") + " train loss | tokens/s | wall |",
              "|---|---:|---|---:|---:|" + ("---:|" if has_em else "") + "---:|---:|---:|"]
    for r in results["runs"]:
        fv = "—" if r["final_val_loss"] is None else f"{r['final_val_loss']:.4f} ({r['final_val_step']})"
        bv = "—" if r["best_val_loss"] is None else f"{r['best_val_loss']:.4f} ({r['best_val_step']})"
        row = [f"`{r['name']}`", str(r["seed"]), r["status"], fv, bv]
        if has_em:
            row.append("—" if r["final_exact_match"] is None else f"{100 * r['final_exact_match']:.1f}%")
        row += ["—" if r["final_loss"] is None else f"{r['final_loss']:.4f}", _fmt_int(r["tokens_per_s"]),
                "—" if r["wall_s"] is None else f"{r['wall_s']:.0f} s"]
        lines.append("| " + " | ".join(row) + " |")
    missing = [r for r in results["runs"] if r["status"] != "finished"]
    if missing:
        lines += ["", f"{len(missing)} run(s) did not finish and are left out of the means: "
                  + ", ".join(f"`{r['name']}` ({r['status']})" for r in missing) + "."]
    if results["plots"]:
        lines += ["", "## Plots", "", "Lines: mean over the finished seeds; bands: min–max over seeds.", ""]
        lines += [f"![{p}]({p})" for p in results["plots"]]
    return "\n".join(lines) + "\n"


def _curves(runs: Sequence[Run], summaries: Sequence[dict], key: str, x: str):
    """{group: (xs, mean, lo, hi, n)} over the finished runs, at the x values all of them logged."""
    import numpy as np
    finished = {s["name"] for s in summaries if s["status"] == "finished"}
    per_group: dict[str, list[dict]] = {}
    for run in runs:
        if run.name not in finished:
            continue
        rows = read_metrics(os.path.join(run.run_dir, "metrics.jsonl"))
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


def plot_curves(out_dir: str, runs: Sequence[Run], summaries: Sequence[dict]) -> list[str]:
    """val loss vs step and vs tokens, exact match vs step (when logged): one line per group, bands
    min–max over seeds. 800x500 PNGs. Returns the file names written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [("val_loss", "step", "val_loss_vs_step.png", "validation loss", "step"),
             ("val_loss", "tokens", "val_loss_vs_tokens.png", "validation loss", "training tokens"),
             ("exact_match", "step", "exact_match_vs_step.png", "exact match (held-out)", "step")]
    written = []
    colors = plt.get_cmap("tab10").colors
    order = list(dict.fromkeys(r.group for r in runs))
    for key, x, fname, ylabel, xlabel in specs:
        curves = _curves(runs, summaries, key, x)
        if not curves:
            continue
        # loss curves get a second panel zoomed on the second half of training, where the
        # schedules differ by little next to the early drop
        zoom = key == "val_loss" and any(len(c[0]) > 2 for c in curves.values())
        fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(8, 5), dpi=100, squeeze=False,
                                 gridspec_kw={"width_ratios": [3, 2]} if zoom else None)
        for i, ax in enumerate(axes[0]):
            for group, (xs, mean, lo, hi, n) in curves.items():
                keep = xs >= xs.max() / 2 if i == 1 else slice(None)
                c = colors[order.index(group) % len(colors)]
                ax.plot(xs[keep], mean[keep], color=c, lw=1.8, marker="o", ms=3,
                        label=f"{group} (n={n})")
                if n > 1:
                    ax.fill_between(xs[keep], lo[keep], hi[keep], color=c, alpha=0.2, lw=0)
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_title("second half (zoom)", fontsize=9)
        ax0 = axes[0][0]
        ax0.set_ylabel(ylabel)
        if key == "exact_match":
            ax0.set_ylim(-0.02, 1.02)
        ax0.legend(fontsize=8)
        fig.suptitle(f"{ylabel} vs {xlabel}: mean over seeds, band = min–max over seeds", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, fname), dpi=100)
        plt.close(fig)
        shrink_png(os.path.join(out_dir, fname))
        written.append(fname)
    return written


def shrink_png(path: str, colors: int = 64) -> None:
    """Rewrite a plot PNG with a palette of `colors` colours (line plots use a handful; the bands'
    blends need a few dozen): about a quarter of the RGBA size, so results stay small in git."""
    from PIL import Image
    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# ---- the command line ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare.py", allow_abbrev=False,
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
    p.add_argument("--title", default="", help="heading of results.md (default: the --out name)")
    p.add_argument("--report_only", action="store_true", help="do not train; report the runs on disk")
    p.add_argument("--plan", action="store_true", help="print each run and what would happen, then exit")
    p.add_argument("--retry_failed", action="store_true",
                   help="train again runs that failed before (e.g. a non-finite loss)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        overrides = split_overrides(rest)
        for key, _ in overrides:
            if key in GRID_FIELDS:
                raise CompareError(f"--config.{key} is set per run by the grid; use {GRID_FIELDS[key]} "
                                   "instead.")
        config = load_config(args.config, overrides)
        schedules, seeds = parse_schedules(args.schedules), parse_seeds(args.seeds)
        variants = [parse_variant(v) for v in args.variant]
        runs_dir = args.runs_dir or os.path.join("runs", "compare",
                                                 os.path.basename(os.path.normpath(args.out)))
        runs = plan_grid(config, schedules, seeds, runs_dir, variants)
        if args.plan:
            for run in runs:
                st = run_state(run.run_dir, run.config)
                print(f"{run.name:28s} {st.kind:9s} {st.detail}  ({run.run_dir})")
            return 0
        t0 = time.perf_counter()
        outcome = {} if args.report_only else run_grid(runs, retry_failed=args.retry_failed)
        summaries = collect(runs)
        groups = aggregate(summaries)
        command = " ".join(["python compare.py"] + [_quote(a) for a in argv])
        results = write_report(args.out, runs, summaries, groups, command=command, title=args.title,
                               outcome=outcome)
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{len(runs)} runs ({sum(s['status'] == 'finished' for s in summaries)} finished) in "
          f"{time.perf_counter() - t0:.0f} s; results: {os.path.join(args.out, 'results.md')}")
    for g in results["groups"]:
        print(f"  {g['group']:24s} final val loss {_fmt(g['final_val_loss'])}"
              + (f"  exact match {_fmt(g['final_exact_match'], 3)}" if g["final_exact_match"]["n"] else ""))
    return 0


def _quote(word: str) -> str:
    return word if re.fullmatch(r"[\w.,:=/+-]+", word) else "'" + word.replace("'", "'\\''") + "'"


if __name__ == "__main__":
    sys.exit(main())
