"""What is on disk for each run of a grid (new, partial, finished or failed) and training the grid:
one run after the other in this process, with the trainer of `train.py`."""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import time
from typing import Callable, Optional, Sequence

from ml_collections import ConfigDict

from reflex_jax.errors import ReflexError
from reflex_jax.run_config import flatten_config, model_fields

from .grid import CompareError, Run

RUN_MARKER = "compare_run.json"  # per run dir: wall time, trained-by-compare bookkeeping, failures
# config fields that do not change what a run computes (they may differ between a run and the grid)
IGNORED_FIELDS = ("run_dir", "async_checkpoints", "tensorboard", "wandb", "keep_checkpoints",
                  "checkpoint_interval", "checkpoint_minutes", "log_interval", "profile_steps",
                  "data.prefetch")


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def read_marker(run_dir: str) -> dict:
    """The run directory's compare bookkeeping ({} when compare never trained it)."""
    return read_json(os.path.join(run_dir, RUN_MARKER)) or {}


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


def _normalised(config_dict: dict) -> dict:
    d = json.loads(json.dumps(config_dict, default=str))
    if isinstance(d.get("model"), dict):
        # one key for the head plan, under its old name model.reflex, as the configs (and the
        # fingerprints of the reports) of runs from before the rename to head_plan have it
        model = model_fields(d["model"])
        model["reflex"] = model.pop("head_plan", None)
        d["model"] = model
    flat = flatten_config(d)
    if flat.get("data.document_mask") is False:
        # what every run recorded before the switch existed did, so their fingerprints still hold
        del flat["data.document_mask"]
    return {k: v for k, v in flat.items()
            if k.split(".")[0] not in IGNORED_FIELDS and k not in IGNORED_FIELDS}


def config_fingerprint(config_dict: dict) -> str:
    """A short hash of what a run computes (its config without IGNORED_FIELDS): a recorded result
    counts for a run of the grid only when the fingerprints agree. The data directory counts by its
    name, not its location, so a checkout elsewhere (or a relative path) keeps its records; what
    it holds is checked apart (data_identity), where it is there to read."""
    flat = _normalised(config_dict)
    if flat.get("data.dir"):
        flat["data.dir"] = os.path.basename(os.path.normpath(str(flat["data.dir"])))
    text = json.dumps(flat, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def data_identity(config_dict: dict) -> Optional[str]:
    """reflex_jax.data.verify.data_fingerprint of the run's prepared data directory (which data,
    wherever it lies), or None without one (a built-in task is named by the config itself) or
    where it is not there to read."""
    path = (config_dict.get("data") or {}).get("dir")
    if not path or not os.path.isfile(os.path.join(str(path), "meta.json")):
        return None
    from reflex_jax.data.verify import data_fingerprint
    try:
        return data_fingerprint(str(path))
    except (ReflexError, OSError, ValueError, KeyError):
        return None


def config_difference(stored: dict, wanted: dict) -> Optional[str]:
    """'max_steps=100 there, 200 here' for the first field that differs, or None."""
    a, b = _normalised(stored), _normalised(wanted)
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            name = "model.head_plan" if key == "model.reflex" else key  # see _normalised
            return f"{name}={a.get(key, '<absent>')!r} there, {b.get(key, '<absent>')!r} here"
    return None


def read_recorded(out_dir: str) -> dict[str, dict]:
    """{run name: summary} of the finished runs an earlier report in `out_dir` recorded: what
    stands for a run whose directory is gone (run directories hold checkpoints and are not kept in
    git; the report is)."""
    results = read_json(os.path.join(out_dir, "results.json")) or {}
    return {r["name"]: r for r in results.get("runs", [])
            if isinstance(r, dict) and r.get("status") == "finished" and "name" in r}


def recorded_summary(run: Run, recorded: dict[str, dict]) -> Optional[dict]:
    """The recorded summary of `run` (see read_recorded), or None when there is none; a record of
    the same name trained with another config raises CompareError: it belongs to another grid."""
    record = recorded.get(run.name)
    if record is None:
        return None
    if record.get("config_sha") != config_fingerprint(run.config.to_dict()):
        raise CompareError(f"the report in --out records a finished run {run.name!r} trained with a "
                           "different config (or before configs were fingerprinted), and its run "
                           "directory is gone; use another --out, or delete that results.json to drop "
                           "its runs.")
    data_sha = data_identity(run.config.to_dict())
    if data_sha and record.get("data_sha") not in (None, data_sha):
        raise CompareError(f"the report in --out records a finished run {run.name!r} trained on other "
                           f"data than {run.config.data.dir} holds now (same directory name, another "
                           "fingerprint), and its run directory is gone; prepare the data it was "
                           "trained on, or use another --out.")
    # a record from before data fingerprints takes the data its directory name names on trust
    return dict(record, status="finished", source="recorded",
                data_sha=record.get("data_sha") or data_sha)


@dataclasses.dataclass
class RunState:
    kind: str                 # new | partial | finished | failed | recorded (see grid_states)
    step: int = 0             # last step logged in metrics.jsonl
    detail: str = ""          # why (partial and failed runs)


def run_state(run_dir: str, config: ConfigDict) -> RunState:
    """What the grid should do with `run_dir`: train it (new), resume it (partial), reuse it
    (finished), or leave it (failed: a recorded training failure such as a non-finite loss).

    Finished means metrics.jsonl reached max_steps and, if the run wrote checkpoints, the final step's
    checkpoint exists (a run killed while saving it resumes instead). A run directory written with a
    different config raises CompareError: its numbers would not belong to this grid.
    """
    max_steps = int(config.max_steps)
    stored = read_json(os.path.join(run_dir, "config.json"))
    if stored is not None:
        diff = config_difference(stored, config.to_dict())
        if diff:
            raise CompareError(f"run directory {run_dir!r} was trained with a different config "
                               f"({diff}); use another --out/--runs_dir or delete that directory.")
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    step = int(rows[-1]["step"]) if rows else 0
    marker = read_marker(run_dir)
    if marker.get("error") and step < max_steps:
        return RunState("failed", step, marker["error"])
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    if step >= max_steps:
        if os.path.isdir(ckpt_dir) and not os.path.isdir(os.path.join(ckpt_dir, str(max_steps))):
            return RunState("partial", step, f"no checkpoint of step {max_steps} yet")
        return RunState("finished", step)
    if step > 0 or os.path.isdir(ckpt_dir):
        return RunState("partial", step, f"step {step} of {max_steps}")
    return RunState("new", 0)


def train_run(run: Run, log: Callable[[str], None] = print) -> dict:
    """Train (or resume) one run in this process; record its wall time in the run directory.
    Config mistakes raise CompareError; a failure during training (a non-finite loss) is recorded
    and returned as {'error': ...} so the rest of the grid still runs."""
    from reflex_jax.train.trainer import Trainer

    marker = read_marker(run.run_dir)
    t0 = time.perf_counter()
    try:
        trainer = Trainer(run.config, log=log)
    except ReflexError as e:
        raise CompareError(f"run {run.name}: {e}") from None
    error, summary = None, {}
    try:
        summary = trainer.train()
    except ReflexError as e:
        error = str(e)
    wall = time.perf_counter() - t0
    marker = {"wall_s": marker.get("wall_s", 0.0) + wall, "sessions": marker.get("sessions", 0) + 1,
              "updated": now_utc()}
    if error:
        marker["error"] = error
    os.makedirs(run.run_dir, exist_ok=True)
    with open(os.path.join(run.run_dir, RUN_MARKER), "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)
    del trainer
    return {"error": error} if error else summary


def _train_one(run: Run, st: RunState, head: str, log: Callable[[str], None]) -> str:
    """Train or resume one run that is not finished; its outcome for run_grid."""
    if st.kind == "failed":
        os.remove(os.path.join(run.run_dir, RUN_MARKER))
    log(f"{head}: " + ("training" if st.kind == "new" else f"resuming ({st.detail})"))
    result = train_run(run, log=log)
    if result.get("error"):
        log(f"{head}: failed: {result['error']}")
        return "failed"
    if result.get("stopped_by"):
        log(f"{head}: stopped by {result['stopped_by']} at step {result['final_step']}; "
            "the grid stops here (run the same command again to resume)")
        return "stopped"
    return "trained" if st.kind == "new" else "resumed"


def grid_states(runs: Sequence[Run], recorded: dict[str, dict]) -> dict[str, RunState]:
    """run_state of every run, where a new run (no directory) that the report recorded as finished
    is 'recorded': finished, its numbers taken from the report."""
    states = {}
    for r in runs:
        st = run_state(r.run_dir, r.config)
        if st.kind == "new" and recorded_summary(r, recorded) is not None:
            st = RunState("recorded", int(r.config.max_steps), "run directory gone; numbers from the report")
        states[r.name] = st
    return states


def run_grid(runs: Sequence[Run], *, retry_failed: bool = False, recorded: Optional[dict] = None,
             log: Callable[[str], None] = print) -> dict[str, str]:
    """Train what is not finished; returns {run name: 'trained' | 'resumed' | 'reused' | 'recorded'
    | 'failed' | 'stopped'}. A run stopped by SIGINT/SIGTERM stops the grid (the report is still
    written). `recorded` (read_recorded of --out) keeps runs whose directory is gone from training
    again."""
    # check every run directory before any training: a config mismatch found after an hour is worse
    states = grid_states(runs, recorded or {})
    outcome: dict[str, str] = {}
    for i, run in enumerate(runs, 1):
        st = states[run.name]
        head = f"[{i}/{len(runs)}] {run.name}"
        if st.kind == "finished":
            log(f"{head}: finished before (step {st.step}), reused")
            outcome[run.name] = "reused"
        elif st.kind == "recorded":
            log(f"{head}: finished before, recorded in the report (run directory gone), reused")
            outcome[run.name] = "recorded"
        elif st.kind == "failed" and not retry_failed:
            log(f"{head}: failed before ({st.detail}); not retried (pass --retry_failed to retry)")
            outcome[run.name] = "failed"
        else:
            outcome[run.name] = _train_one(run, st, head, log)
            if outcome[run.name] == "stopped":
                break
    return outcome
