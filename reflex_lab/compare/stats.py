"""The numbers of a grid: one summary per run from its metrics.jsonl, mean ± sample std over the
finished seeds of each group, the paired difference to a baseline group, and the model facts
(parameters, K/V heads, KV-cache bytes per token) of each group's config.

Besides the val loss a summary keeps the final value of each held-out metric the runs logged:
`final_val_bpb`, `final_val_answer_loss` and, for key-value recall, `final_exact_match_d<k>` (exact
match at recall distance k); runs that never logged one have None."""
from __future__ import annotations

import math
import os
import re
import statistics
from typing import Any, Iterable, Optional, Sequence

from ml_collections import ConfigDict

from .grid import Run
from .runs import config_fingerprint, data_identity, read_marker, read_metrics, recorded_summary

METRICS = ("final_val_loss", "best_val_loss", "final_exact_match", "best_exact_match",
           "final_val_bpb", "final_val_answer_loss", "final_loss", "tokens_per_s", "wall_s")


def _val_numbers(rows: Sequence[dict]) -> dict:
    evals = [r for r in rows if r.get("val_loss") is not None and math.isfinite(r["val_loss"])]
    if not evals:
        return {"eval_rows": 0, "final_val_loss": None, "final_val_step": None, "best_val_loss": None,
                "best_val_step": None}
    best = min(evals, key=lambda r: r["val_loss"])
    return {"eval_rows": len(evals), "final_val_loss": float(evals[-1]["val_loss"]),
            "final_val_step": int(evals[-1]["step"]), "best_val_loss": float(best["val_loss"]),
            "best_val_step": int(best["step"])}


def _steady_tokens_per_s(rows: Sequence[dict]) -> Optional[float]:
    # training-only log intervals (not the first, which compiles; not eval rows, whose interval
    # includes the evaluation); the median resists the odd slow interval on a shared box
    steady = [r["tokens_per_s"] for r in rows[1:] if "tokens_per_s" in r and r.get("val_loss") is None]
    if not steady:
        steady = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    return float(statistics.median(steady)) if steady else None


def summarize_run(rows: Sequence[dict], max_steps: int) -> dict:
    """Final/best validation numbers, exact match and throughput of one run's metric rows."""
    step = int(rows[-1]["step"]) if rows else 0
    val = _val_numbers(rows)
    out: dict[str, Any] = {"step": step, "max_steps": int(max_steps), "finished": step >= max_steps,
                           "eval_rows": val.pop("eval_rows")}
    out["final_loss"] = float(rows[-1]["loss"]) if rows and "loss" in rows[-1] else None
    out["tokens"] = int(rows[-1]["tokens"]) if rows and "tokens" in rows[-1] else None
    out.update(val)
    em = [r for r in rows if r.get("exact_match") is not None]
    out["final_exact_match"] = float(em[-1]["exact_match"]) if em else None
    out["best_exact_match"] = max(float(r["exact_match"]) for r in em) if em else None
    for key in ("val_bpb", "val_answer_loss") + distance_keys(rows):
        out[f"final_{key}"] = _last_value(rows, key)
    out["tokens_per_s"] = _steady_tokens_per_s(rows)
    out["curve"] = [{k: r[k] for k in CURVE_KEYS if r.get(k) is not None} for r in rows
                    if r.get("val_loss") is not None or r.get("exact_match") is not None]
    return out


# what a summary keeps of each eval row: enough to draw the report's curves without the run directory
CURVE_KEYS = ("step", "tokens", "val_loss", "exact_match")


def _last_value(rows: Sequence[dict], key: str) -> Optional[float]:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(values[-1]) if values else None


def distance_keys(dicts: Iterable[dict], prefix: str = "") -> tuple[str, ...]:
    """The `<prefix>exact_match_d<k>` keys that any of `dicts` has, by ascending k."""
    pattern = re.compile(re.escape(prefix) + r"exact_match_d(\d+)")
    found = {int(m.group(1)) for d in dicts for k in d if (m := pattern.fullmatch(k))}
    return tuple(f"{prefix}exact_match_d{k}" for k in sorted(found))


def mean_std(values: Iterable[Optional[float]]) -> dict:
    """{'mean', 'std' (sample std, ddof=1; None for fewer than 2 values), 'n'} over non-None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    std = statistics.stdev(vals) if len(vals) > 1 else None
    return {"mean": statistics.fmean(vals), "std": std, "n": len(vals)}


def model_facts(config: ConfigDict) -> dict:
    """Parameters, K/V heads, KV-cache bytes per token and train FLOPs per token (6 x matmul
    parameters + attention at the full block, train/flops.py) of a config's model (no weights
    allocated)."""
    import jax
    import numpy as np

    from reflex_jax.model import count_params, init_params, kv_cache_bytes
    from reflex_jax.run_config import model_config_from
    from reflex_jax.train.flops import train_flops_per_token

    cfg = model_config_from(config)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    dtype = np.dtype(cfg.compute_dtype)
    return {"params": count_params(shapes), "kv_heads": cfg.kv_heads_total,
            "kv_heads_vanilla": cfg.n_layer * cfg.n_head,
            "kv_bytes_per_token": int(kv_cache_bytes(cfg, 1, 1)), "kv_dtype": dtype.name,
            "layout": cfg.schedule_table(), "itemsize": dtype.itemsize,
            "train_flops_per_token": int(train_flops_per_token(cfg, cfg.block_size))}


def _status(summary: dict, marker: dict, has_rows: bool) -> str:
    if marker.get("error") and not summary["finished"]:
        return f"failed at step {summary['step']}: {marker['error']}"
    if not has_rows:
        return "missing"
    if summary["finished"]:
        return "finished"
    return f"unfinished (step {summary['step']} of {summary['max_steps']})"


def collect(runs: Sequence[Run], recorded: Optional[dict] = None) -> list[dict]:
    """One summary per run of the grid: from its metrics.jsonl; for a run with no metrics on disk,
    the summary `recorded` (read_recorded of --out) holds for it, else status 'missing'."""
    out = []
    for run in runs:
        rows = read_metrics(os.path.join(run.run_dir, "metrics.jsonl"))
        kept = None if rows else recorded_summary(run, recorded or {})
        if kept is not None:
            out.append(kept)
            continue
        s = summarize_run(rows, int(run.config.max_steps))
        marker = read_marker(run.run_dir)
        config = run.config.to_dict()
        s.update(name=run.name, group=run.group, schedule=run.schedule, variant=run.variant,
                 seed=run.seed, run_dir=run.run_dir, wall_s=marker.get("wall_s"),
                 config_sha=config_fingerprint(config), data_sha=data_identity(config))
        s["status"] = _status(s, marker, bool(rows))
        out.append(s)
    return out


# the metrics paired differences are given for (when both runs of a pair have them)
PAIRED = ("final_val_loss", "final_val_bpb", "final_val_answer_loss", "final_exact_match")


def _paired_delta(done: Sequence[dict], base_by_seed: dict, metric: str) -> dict:
    """mean ± std over seeds of (metric - the baseline's metric of the same seed)."""
    diffs = [s[metric] - base_by_seed[s["seed"]][metric] for s in done
             if s["seed"] in base_by_seed and s.get(metric) is not None
             and base_by_seed[s["seed"]].get(metric) is not None]
    return mean_std(diffs)


def aggregate(summaries: Sequence[dict], baseline: Optional[str] = None,
              also_against: Sequence[str] = ()) -> list[dict]:
    """Per group (in first-seen order): mean ± std over the finished runs of every metric, and the
    final val loss difference to `baseline` (default: the first group) paired by seed. `paired`
    holds, for the baseline and each group of `also_against` (matched controls), the paired
    differences of every PAIRED metric."""
    groups: dict[str, list[dict]] = {}
    for s in summaries:
        groups.setdefault(s["group"], []).append(s)
    baseline = baseline or (next(iter(groups)) if groups else None)
    finished = {name: {s["seed"]: s for s in members if s["status"] == "finished"}
                for name, members in groups.items()}
    against = list(dict.fromkeys([baseline, *(b for b in also_against if b in groups)]))
    out = []
    for name, members in groups.items():
        done = [s for s in members if s["status"] == "finished"]
        g = {"group": name, "schedule": members[0]["schedule"], "variant": members[0]["variant"],
             "runs": len(members), "finished": len(done), "seeds": [s["seed"] for s in done],
             "not_finished": {s["name"]: s["status"] for s in members if s["status"] != "finished"}}
        for m in METRICS + distance_keys(members, "final_"):
            g[m] = mean_std(s.get(m) for s in done)
        g["paired"] = {b: {m: _paired_delta(done, finished.get(b, {}), m) for m in PAIRED}
                       for b in against if b != name}
        if name != baseline:
            g["delta_final_val_loss"] = g["paired"][baseline]["final_val_loss"]
            g["delta_vs"] = baseline
        out.append(g)
    return out
