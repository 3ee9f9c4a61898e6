"""A run's held-out evaluation: the validation batches through the program's compiled eval step
(train/validation.py), the learned route weights of `route` plans, exact match on a built-in
task's held-out questions, and lm-evaluation-harness tasks on the live params (TaskEvaluator)."""
from __future__ import annotations

from .. import data as data_lib
from ..errors import TrainingError
from ..model import route_metrics
from . import validation


class Evaluator:
    """`evaluator(params) -> {metric: value}` for the run `program.config` over `data`."""

    def __init__(self, program, data):
        self.program, self.data, self.config = program, data, program.config
        c = self.config
        self._val = None
        self._exact_match = None
        # built now when evals will use it: a prompt longer than the block refuses before training
        if c.data.task and c.eval_exact_match > 0 and c.eval_interval:
            self._exact_match = self._make_exact_match()

    def val_batches(self) -> list:
        if self._val is None:
            c = self.config
            rows = c.batch_size // c.grad_accum if c.grad_accum > 1 else c.batch_size
            self._val = data_lib.val_batches(self.data, rows, self.program.seq_len,
                                             c.eval_batches, documents=c.data.document_mask)
        return self._val

    def __call__(self, params) -> dict:
        program, sums = self.program, []
        for b in self.val_batches():
            batch = program.put_batch(program.local_rows(b), program.eval_batch_keys,
                                      global_rows=b["tokens"].shape[0])
            sums.append(program.eval_step(params, batch))
        out = validation.val_metrics(sums, answers=validation.has_answers(self.data.meta))
        out.update(route_metrics(program.model_config, params))  # `route` plans' route weights
        if self.config.data.task and self.config.eval_exact_match > 0:
            out.update(self.exact_match(params))
        return out

    def _make_exact_match(self):
        from .exact_match import ExactMatch
        return ExactMatch(self.data, self.program.model_config, self.config.data.task,
                          self.config.eval_exact_match)

    def exact_match(self, params) -> dict:
        """Greedy answers to held-out task questions, scored by the task's exact-match rule."""
        if self._exact_match is None:
            self._exact_match = self._make_exact_match()
        return self._exact_match(params, self.program.mesh)


def task_evaluator(program, data):
    """The run's lm-eval task scorer (`eval_tasks` every `eval_tasks_interval` steps), or None
    when off; a config that would fail (an unknown task, a bad interval) is one sentence now,
    before training."""
    c = program.config
    interval, tasks = c.get("eval_tasks_interval", 0), _names(c.get("eval_tasks", ""))
    if not isinstance(interval, int) or isinstance(interval, bool) or interval < 0:
        raise TrainingError(f"eval_tasks_interval={interval!r} must be an integer >= 0 (steps "
                            "between lm-eval task scores; 0 turns them off).")
    limit = c.get("eval_tasks_limit", 0) or 0
    if not isinstance(limit, (int, float)) or isinstance(limit, bool) or not limit >= 0:
        raise TrainingError(f"eval_tasks_limit={limit!r} must be a number >= 0 (documents per "
                            "task; 0: all, below 1: a fraction).")
    if not tasks:
        return None
    if not interval:
        raise TrainingError(f"eval_tasks={c.eval_tasks!r} is set but eval_tasks_interval=0 never "
                            "scores them; set --config.eval_tasks_interval=N (steps).")
    return TaskEvaluator(program, data, tasks, interval, limit)


def _names(text) -> list[str]:
    return [t.strip() for t in str(text or "").split(",") if t.strip()]


class TaskEvaluator:
    """`evaluator(params) -> {"task/<task>/<metric>": value}`: lm-eval's tasks on the live params,
    on the training mesh, with the run's tokenizer (lm_eval_model.ReflexLM). Every process runs
    every request (each batch is one collective computation); process 0 logs."""

    def __init__(self, program, data, tasks: list[str], interval: int, limit: float):
        import os
        from ..harness import task_manager
        c = program.config
        paths = _names(c.get("eval_task_paths", ""))
        for p in paths:
            if not os.path.isdir(p):
                raise TrainingError(f"eval_task_paths names {p!r}, which is not a directory; "
                                    "list the directories that hold your task YAML files.")
        self.manager, unknown = task_manager(tasks, paths)  # lm-eval missing: one sentence
        if unknown:
            raise TrainingError(f"eval_tasks names {unknown[0]!r}, a task lm-eval does not know; "
                                "list them with `lm_eval ls tasks`, or add the directory of its "
                                "YAML to --config.eval_task_paths.")
        from ..lm_eval_model import ReflexLM
        self.program, self.tasks, self.interval = program, tasks, interval
        self.limit = None if not limit else (int(limit) if limit >= 1 else float(limit))
        rows = c.batch_size // c.grad_accum  # a micro-batch: a multiple of the batch shards
        self.lm = ReflexLM(model_config=program.model_config, tokenizer=data.meta["tokenizer"],
                           mesh=program.mesh, kernels=program.kernels, batch_size=rows,
                           quiet=True)

    def due(self, step: int, last: bool) -> bool:
        return step % self.interval == 0 or last

    def __call__(self, params) -> dict:
        import lm_eval
        from ..harness import task_metric_names, task_metrics
        program = self.program
        if getattr(program, "lora", None) is not None:  # adapters: score the merged params
            params = program.model_params(params)
        self.lm.params = params
        try:  # the global random seeds are left alone: training owns them
            results = lm_eval.simple_evaluate(
                model=self.lm, tasks=self.tasks, task_manager=self.manager, limit=self.limit,
                log_samples=False, random_seed=None, numpy_random_seed=None,
                torch_random_seed=None)
        finally:
            self.lm.params = None  # the next step donates these buffers
        return task_metric_names(task_metrics(results))
