"""The loop and its bookkeeping between steps: pending metrics and the non-finite check,
logging, evaluation, and checkpoint saves (never of non-finite params). It is given what it calls
(the compiled step, the next batch, evaluation, whether a stop was requested); it knows no
Trainer."""
from __future__ import annotations

import signal
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import checkpoint as ckpt
from .. import storage
from ..errors import TrainingError
from . import flops
from .metrics import MetricsLog, progress_bar
from .step import TrainState


class StopRequest:
    """SIGTERM and SIGINT, while inside `with`, ask the loop to stop after the current step
    (it saves and returns); `reason` names the signal, `stop_requested()` polls it."""

    def __init__(self):
        self.reason: Optional[str] = None
        self._old: dict = {}

    def stop_requested(self) -> bool:
        return self.reason is not None

    def _on_signal(self, signum, frame):
        self.reason = signal.Signals(signum).name

    def __enter__(self):
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class TrainLoop:
    """The loop from `start` to `config.max_steps` (or a requested stop): each step's batch, the
    compiled step, then pending metrics, the NaN check, logging, evaluation and saving.

    `evaluate(params) -> metrics` runs at every eval_interval; `stop_requested()` is polled after
    every step."""

    def __init__(self, config, model_config, checkpoints: ckpt.RunCheckpoints, start: int, *,
                 evaluate: Callable[[object], dict], stop_requested: Callable[[], bool],
                 is_main: bool = True):
        c = self.config = config
        self.checkpoints, self.evaluate, self.stop_requested = checkpoints, evaluate, stop_requested
        seq_len = model_config.block_size
        self.metrics_log = MetricsLog(storage.join(c.run_dir, "metrics.jsonl"), start,
                                      is_main, tensorboard=c.tensorboard, wandb=c.wandb,
                                      config=c.to_dict())
        self.tokens_per_step = c.batch_size * seq_len
        self.flops_per_token = flops.train_flops_per_token(model_config, seq_len)
        self.peak = flops.device_peak(model_config.compute_dtype)[0] * jax.device_count()
        # the bar starts after the first step returns (its compile), so that its rate and ETA
        # are of training alone (a bar started before read hours for a minute's run)
        self.bar, self.is_main = None, is_main
        self.pending: list = []  # (step, metrics on device) not yet checked/logged
        self.last_saved = checkpoints.latest_step()
        self.start = start
        self.summary: dict = {"run_dir": storage.resolve(c.run_dir), "start_step": start}
        self.t_last, self.steps_since = time.perf_counter(), 0

    def run(self, state: TrainState, train_step: Callable, next_batch: Callable[[int], dict]):
        """(final state, final step): `train_step(state, next_batch(step))` until max_steps or a
        requested stop, then the final save unless that step is saved already."""
        step_ = self.start
        while step_ < self.config.max_steps and not self.stop_requested():
            state, m = train_step(state, next_batch(step_))
            step_ += 1
            self.after_step(step_, m, state)
        if step_ != self.last_saved:
            summary = self.summary
            self.save(step_, state, summary.get("val_loss") if summary.get("step") == step_
                      else None)
        self.summary["final_step"] = step_
        return state, step_

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
        # "good" only for what this run saved (its params were checked finite) or a verified step
        if self.last_saved is None:
            where = "no checkpoint was written"
        elif self.last_saved != self.start or self.checkpoints.verified(self.last_saved):
            where = f"the last good checkpoint is step {self.last_saved} in {self.checkpoints.directory}"
        else:
            where = (f"the last checkpoint, step {self.last_saved} in {self.checkpoints.directory}, "
                     "is unverified (it has no checksums)")
        raise TrainingError(f"{what}; stopping without saving ({where}); lower "
                            "--config.optim.lr or check the data.")

    def save(self, step: int, state: TrainState, val_loss=None):
        self.flush()
        if not bool(_all_finite(state.params)):  # never save what cannot be resumed from
            self._stop_non_finite(f"the params of step {step} are not all finite")
        self.checkpoints.save(step, state.params, state.opt_state, val_loss)
        self.last_saved = step

    def after_step(self, step: int, metrics, state: TrainState):
        c, stopping = self.config, self.stop_requested()
        self.checkpoints.check_for_errors()  # a failed background save stops the run now
        self.steps_since += 1
        self.pending.append((step, metrics))
        if self.bar is None:
            self.bar = progress_bar(c.max_steps, step - 1, self.is_main)
        self.bar.update(1)
        val = None
        if c.eval_interval and (step % c.eval_interval == 0 or step == c.max_steps):
            val = self.evaluate(state.params)
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
        if self.bar is not None:
            self.bar.close()
        self.checkpoints.close()
        self.metrics_log.close()


@jax.jit
def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))
