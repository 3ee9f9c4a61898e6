"""The loop's bookkeeping between steps: pending metrics and the non-finite check, logging,
evaluation, and checkpoint saves (never of non-finite params)."""
from __future__ import annotations

import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import checkpoint as ckpt
from .. import storage
from ..errors import TrainingError
from . import flops
from .metrics import MetricsLog, progress_bar
from .step import TrainState


class TrainLoop:
    """The loop's bookkeeping: pending metrics, the NaN check, logging, evaluation, saving."""

    def __init__(self, trainer, checkpoints: ckpt.RunCheckpoints, start: int):
        c = self.config = trainer.config
        self.trainer, self.checkpoints = trainer, checkpoints
        self.metrics_log = MetricsLog(storage.join(c.run_dir, "metrics.jsonl"), start,
                                      trainer.is_main, tensorboard=c.tensorboard, wandb=c.wandb,
                                      config=c.to_dict())
        self.tokens_per_step = c.batch_size * trainer.seq_len
        self.flops_per_token = flops.train_flops_per_token(trainer.cfg, trainer.seq_len)
        self.peak = flops.device_peak(trainer.cfg.compute_dtype)[0] * jax.device_count()
        self.bar = progress_bar(c.max_steps, start, trainer.is_main)
        self.pending: list = []  # (step, metrics on device) not yet checked/logged
        self.last_saved = checkpoints.latest_step()
        self.summary: dict = {"run_dir": storage.resolve(c.run_dir), "start_step": start}
        self.t_last, self.steps_since = time.perf_counter(), 0

    def flush(self) -> dict:
        """Fetch pending metrics; stop the run on a non-finite loss."""
        fetched = [(s, jax.device_get(m)) for s, m in self.pending]
        self.pending = []
        for s, m in fetched:
            # the loss is computed before step s's update, the gradient norm from the gradients
            # the update applied: a non-finite one means step s's params are damaged
            for name in ("loss", "grad_norm"):
                if not np.isfinite(m[name]):
                    self._stop_non_finite(f"{'the loss' if name == 'loss' else 'the gradient norm'}"
                                          f" became {m[name]} at step {s}")
        return fetched[-1][1] if fetched else {}

    def _stop_non_finite(self, what: str):
        where = (f"the last good checkpoint is step {self.last_saved} in "
                 f"{self.checkpoints.directory}" if self.last_saved is not None
                 else "no checkpoint was written")
        raise TrainingError(f"{what}; stopping without saving ({where}); lower "
                            "--config.optim.lr or check the data.")

    def save(self, step: int, state: TrainState, val_loss=None):
        self.flush()
        if not bool(_all_finite(state.params)):  # never save what cannot be resumed from
            self._stop_non_finite(f"the params of step {step} are not all finite")
        self.checkpoints.save(step, state.params, state.opt_state, val_loss)
        self.last_saved = step

    def after_step(self, step: int, metrics, state: TrainState):
        c, stopping = self.config, self.trainer._stop_signal is not None
        self.checkpoints.check_for_errors()  # a failed background save stops the run now
        self.steps_since += 1
        self.pending.append((step, metrics))
        self.bar.update(1)
        val = None
        if c.eval_interval and (step % c.eval_interval == 0 or step == c.max_steps):
            val = self.trainer.evaluate(state.params)
        if ((c.log_interval and step % c.log_interval == 0) or val is not None
                or step == c.max_steps or stopping):
            self.log_row(step, val)
        if val or (c.checkpoint_interval and step % c.checkpoint_interval == 0):
            self.save(step, state, val["val_loss"] if val else None)

    def log_row(self, step: int, val: Optional[dict]):
        last = self.flush()
        now = time.perf_counter()
        tok_s = self.steps_since * self.tokens_per_step / max(now - self.t_last, 1e-9)
        self.t_last, self.steps_since = now, 0
        row = {"step": step, "loss": float(last["loss"]), "lr": float(last["lr"]),
               "grad_norm": float(last["grad_norm"]), "tokens": step * self.tokens_per_step,
               "tokens_per_s": tok_s, "mfu": tok_s * self.flops_per_token / self.peak}
        if val:
            row.update(val)
        self.metrics_log.write(row)
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
                              if k in ("loss", "lr", "tokens_per_s", "mfu", "val_loss", "val_bpb",
                                        "exact_match")})
        self.summary.update(row)

    def close(self):
        self.bar.close()
        self.checkpoints.close()
        self.metrics_log.close()



@jax.jit
def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))
