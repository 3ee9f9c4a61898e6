"""Benchmarks through lm-evaluation-harness: export a run as an HF directory, then run lm-eval's
`hf` model on it (docs/export.md#lm-evaluation-harness).

`evaluate_run(run, tasks)` is what `python -m reflex_jax.cli.harness` calls. lm-eval is an optional
dependency (`pip install -e '.[eval]'`); nothing here imports it before it is needed.
"""
from __future__ import annotations

import importlib
import os
import tempfile
from typing import Optional, Sequence, Union

from .errors import MissingFileError, UsageError

INSTALL_HINT = "pip install -e '.[eval]'"


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        importlib.import_module("torch")  # the `hf` model runs on it (accelerate depends on it)
    except ImportError:
        raise UsageError(f"lm-eval is not installed; install it with {INSTALL_HINT}.") from None
    return lm_eval, TaskManager


def run_tokenizer(run: str) -> str:
    """The tokenizer `run`'s meta.json names (lm-eval tokenizes the task text with it)."""
    from . import storage
    from .checkpoint import read_checkpoint_meta
    if not storage.isdir(storage.resolve(run)):
        raise MissingFileError(f"run directory {run!r} does not exist; pass a directory written "
                               "by train.py or convert_weights.py.")
    tokenizer = read_checkpoint_meta(run).get("tokenizer")
    if not tokenizer:
        raise UsageError(f"{run!r} names no tokenizer in meta.json; lm-eval needs one, so record "
                         "it there (e.g. \"tokenizer\": \"bytes\" or a tokenizer directory).")
    return tokenizer


def default_device() -> str:
    """lm-eval's `hf` model asks for cuda unless told otherwise, also where torch has none."""
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's per-task results, numbers only, keyed as lm-eval keys them ("acc,none", ...)."""
    return {task: {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in results["results"].items()}


def evaluate_run(run: str, tasks: Sequence[str], *, out_dir: Optional[str] = None,
                 limit: Optional[Union[int, float]] = None, batch_size: int = 1,
                 include_path: Optional[str] = None, step: Optional[int] = None,
                 include_defaults: bool = True, device: Optional[str] = None) -> dict:
    """Per-task metrics of `run` on lm-eval `tasks`, {task: {"acc,none": 0.31, ...}}.

    The run is exported to `out_dir` (kept) or a temporary directory (removed afterwards) and
    evaluated in float32 on `device` (default: cuda if torch has it, else cpu). `include_path`
    adds a directory of task YAMLs; `include_defaults=False` skips indexing lm-eval's own
    thousands of tasks (seconds faster when only `include_path` tasks run).
    """
    lm_eval, TaskManager = _lm_eval()
    tasks = list(tasks)
    if not tasks:
        raise UsageError("no tasks given; pass lm-eval task names, e.g. xstorycloze_ru.")
    run_tokenizer(run)  # fail before indexing the tasks, which takes seconds
    if include_path is not None and not os.path.isdir(include_path):
        raise UsageError(f"--include_path {include_path!r} is not a directory; pass the directory "
                         "that holds your task YAML files.")
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise UsageError(f"lm-eval knows no task {unknown[0]!r}; list them with `lm_eval ls tasks` "
                         "or add a YAML directory with --include_path.")
    from .interop.export import export_run
    with tempfile.TemporaryDirectory(prefix="reflex_hf_") as tmp:
        export = out_dir or tmp
        export_run("hf", run, export, step=step)  # with the tokenizer meta.json names
        # a dict, not "pretrained=...,..." text: a path may hold commas
        args = {"pretrained": export, "trust_remote_code": True, "dtype": "float32"}
        results = lm_eval.simple_evaluate(
            model="hf", model_args=args, tasks=tasks, limit=limit, batch_size=batch_size,
            device=device or default_device(), task_manager=manager, log_samples=False)
    return task_metrics(results)
