"""A run's held-out evaluation: the validation batches through the program's compiled eval step
(train/validation.py), the learned route weights of `route` plans, and exact match on a built-in
task's held-out questions."""
from __future__ import annotations

from .. import data as data_lib
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
