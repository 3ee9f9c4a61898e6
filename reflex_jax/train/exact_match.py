"""Exact match on a built-in task's held-out questions: greedy answers, scored by the task.

`exact_match` is the hit rate over all scored rows; rows that record a recall distance (kv_recall,
also inside mix) add `exact_match_d1`, `exact_match_d2`, ...: the hit rate of the rows whose asked
pair was that many pairs before the question (d1 = the last pair said)."""
from __future__ import annotations

import jax
import numpy as np

from .. import sharding
from ..errors import TrainingError


class ExactMatch:
    """The held-out prompts of a task run, checked at construction to fit the block."""

    def __init__(self, data, cfg, task_name: str, n_rows: int):
        from ..data import DEFAULT_TEMPLATE, get_task, load_tokenizer, prompt_tokens, task_val_rows
        self.cfg, self.task = cfg, get_task(task_name)
        self.rows = task_val_rows(data.meta)[:n_rows]
        self.tok = load_tokenizer(data.meta["tokenizer"])
        template = data.meta.get("template", DEFAULT_TEMPLATE)
        self.prompts = [prompt_tokens(self.tok, r["question"], template) for r in self.rows]
        self.budget = max(len(self.tok.encode(r["answer"])) for r in self.rows) + 2
        longest = max(len(p) for p in self.prompts) + self.budget
        if longest > cfg.block_size:
            raise TrainingError(
                f"eval_exact_match needs prompt + answer = {longest} tokens but "
                f"model.block_size={cfg.block_size}; raise the block size or set "
                "--config.eval_exact_match=0.")
        self._generator = None

    def __call__(self, params, mesh) -> dict:
        from ..sampling import Generator
        # multi-host params have shards on other hosts; every process gathers a full copy and
        # scores the same rows (only process 0 logs the result)
        host_params = sharding.gather_to_host(params, mesh) if jax.process_count() > 1 else params
        if self._generator is None:
            self._generator = Generator(self.cfg)
        outs = self._generator.generate(host_params, self.prompts, max_new_tokens=self.budget,
                                        eos_id=self.tok.eos_id, pad_id=self.tok.pad_id)
        hits = [self.task.score(self.tok.decode(o), r["answer"]) for o, r in zip(outs, self.rows)]
        return {"exact_match": float(np.mean(hits)), **exact_match_by_distance(hits, self.rows)}


def exact_match_by_distance(hits, rows) -> dict:
    """{"exact_match_d<k>": hit rate of the rows at distance k}, k ascending; rows without a
    "distance" (arithmetic questions) are left out, and distances no row has get no key."""
    buckets: dict[int, list] = {}
    for hit, row in zip(hits, rows):
        if row.get("distance") is not None:
            buckets.setdefault(int(row["distance"]), []).append(bool(hit))
    return {f"exact_match_d{d}": float(np.mean(buckets[d])) for d in sorted(buckets)}
