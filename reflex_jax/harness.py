"""Benchmarks through lm-evaluation-harness (docs/export.md#lm-evaluation-harness): lm-eval's
model on the JAX decoder itself (`backend="jax"`, reflex_jax/lm_eval_model.py), or the run exported
as an HF directory under lm-eval's `hf` model (`backend="hf"`, the cross-check; needs torch).

`evaluate_run(run, tasks)` is what `reflex-eval` calls. lm-eval is an optional dependency
(`pip install -e '.[eval]'`); nothing here imports it before it is needed.
"""
from __future__ import annotations

import importlib
import os
import tempfile
from typing import Optional, Sequence, Union

from .errors import MissingFileError, UsageError

INSTALL_HINT = "pip install -e '.[eval]'"
BACKENDS = ("jax", "hf")


def _lm_eval(torch: bool = False):
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UsageError(f"lm-eval is not installed; install it with {INSTALL_HINT}.") from None
    if torch:
        try:
            importlib.import_module("torch")  # the `hf` model runs on it (accelerate too)
        except ImportError:
            raise UsageError("the hf backend runs lm-eval's `hf` model on PyTorch, which is not "
                             "installed; install torch or use the jax backend.") from None
    return lm_eval, TaskManager


def task_manager(tasks: Sequence[str], include_path=None, include_defaults: bool = True):
    """(lm-eval's TaskManager that knows `tasks`, the names it does not know). lm-eval's own
    ~14,700 tasks are indexed (seconds) only when `include_path` does not hold every task."""
    _, TaskManager = _lm_eval()
    paths = [p for p in ([include_path] if isinstance(include_path, str) else include_path or [])
             if p]
    for p in paths:
        if not os.path.isdir(p):
            raise UsageError(f"task directory {p!r} does not exist; pass the directory that "
                             "holds your task YAML files.")
    manager = None
    if paths:
        manager = TaskManager(include_path=paths, include_defaults=False)
        if any(not manager.match_tasks([t]) for t in tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=paths or None, include_defaults=include_defaults)
    return manager, [t for t in tasks if not manager.match_tasks([t])]


def task_metric_names(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """`task_metrics` flattened as a training run logs them: task/<task>/<metric>, lm-eval's
    ",none" filter suffix dropped (other filters kept: task/gsm8k/exact_match,strict-match)."""
    return {f"task/{task}/{name.removesuffix(',none')}": value
            for task, values in metrics.items() for name, value in values.items()}


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


def evaluate_run(run: str, tasks: Sequence[str], *, backend: str = "jax",
                 out_dir: Optional[str] = None, limit: Optional[Union[int, float]] = None,
                 batch_size: int = 8, include_path: Optional[str] = None,
                 step: Optional[int] = None, include_defaults: bool = True,
                 device: Optional[str] = None, fsdp: int = 1, tensor: int = 1,
                 add_bos_token: bool = False) -> dict:
    """Per-task metrics of `run` on lm-eval `tasks`, {task: {"acc,none": 0.31, ...}}.

    `backend="jax"`: lm-eval's `reflex_jax` model (lm_eval_model.ReflexLM) on a mesh of this
    host's devices (`fsdp`, `tensor`; data the rest), `add_bos_token` as it documents. `"hf"`: the
    run is exported to `out_dir` (kept) or a temporary directory (removed afterwards) and
    lm-eval's `hf` model evaluates it in float32 on `device` (default: cuda if torch has it, else
    cpu). `include_path` adds a directory of task YAMLs; `include_defaults=False` never indexes
    lm-eval's own tasks.
    """
    if backend not in BACKENDS:
        raise UsageError(f"backend {backend!r} is unknown; use jax (the JAX decoder) or hf (an "
                         "HF export on PyTorch).")
    if backend == "jax":
        for name, value in (("out_dir", out_dir), ("device", device)):
            if value is not None:
                raise UsageError(f"{name} is for the hf backend; the jax backend exports nothing "
                                 "and runs on JAX's devices (JAX_PLATFORMS picks them).")
    lm_eval, _ = _lm_eval(torch=backend == "hf")
    tasks = list(tasks)
    if not tasks:
        raise UsageError("no tasks given; pass lm-eval task names, e.g. xstorycloze_ru.")
    run_tokenizer(run)  # fail before indexing the tasks, which takes seconds
    manager, unknown = task_manager(tasks, include_path, include_defaults)
    if unknown:
        raise UsageError(f"lm-eval knows no task {unknown[0]!r}; list them with `lm_eval ls tasks` "
                         "or add a YAML directory with --include_path.")
    if backend == "jax":
        from .lm_eval_model import ReflexLM
        lm = ReflexLM(run=run, step=step, batch_size=batch_size, fsdp=fsdp, tensor=tensor,
                      add_bos_token=add_bos_token)
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit,
                                          task_manager=manager, log_samples=False)
        return task_metrics(results)
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
