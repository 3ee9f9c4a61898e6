"""The loop and its bookkeeping between steps: pending metrics and the non-finite check,
logging, evaluation, and checkpoint saves (never of non-finite params). It is given what it calls
(the compiled step, the next batch, evaluation, whether a stop was requested); it knows no
Trainer."""
from __future__ import annotations

import os
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
from .checks import profile_window
from .metrics import MetricsLog, progress_bar
from .step import TrainState


class StopRequest:
    """SIGTERM and SIGINT, while inside `with`, ask the loop to stop after the current step (it
    saves and returns); `reason` names the signal.

    One process: a Python handler sets the flag. Several processes (a pod): every host must stop
    at the same step, or the one that stops waits forever in the next collective while the others
    wait in the save. SIGTERM then goes to JAX's preemption service (its own handler notifies the
    coordination service), and `stop_at(step)` asks JAX's sync point, which is true on every host
    at the same step once any host got SIGTERM; SIGINT is turned into a SIGTERM of this process so
    that it takes the same path. No collective per step: the sync point is agreed by the
    coordination service when a notice arrives."""

    def __init__(self, multi_process: Optional[bool] = None):
        self.multi_process = (jax.process_count() > 1 if multi_process is None else multi_process)
        self.reason: Optional[str] = None
        self._old: dict = {}

    def stop_at(self, step: int) -> bool:
        """Whether to stop after `step` (call once per step, with every step, on every host)."""
        if self.reason is None and self.multi_process:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                self.reason = "SIGTERM (preemption, agreed by every host)"
        return self.reason is not None

    def _on_signal(self, signum, frame):
        self.reason = signal.Signals(signum).name

    def _on_sigint_multi(self, signum, frame):
        os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption handler takes it from here

    def __enter__(self):
        if self.multi_process:  # leave SIGTERM to JAX's preemption notifier
            self._old = {signal.SIGINT: signal.signal(signal.SIGINT, self._on_sigint_multi)}
        else:
            self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class TrainLoop:
    """The loop from `start` to `config.max_steps` (or a requested stop): each step's batch, the
    compiled step, then pending metrics, the NaN check, logging, evaluation and saving.

    `evaluate(params) -> metrics` runs at every eval_interval, `evaluate_tasks` (an
    evaluator.TaskEvaluator, or None) when it is due; `stop_at(step)` is asked once after every
    step (StopRequest.stop_at). Saves come every `checkpoint_interval` steps and, with
    `checkpoint_minutes`, once that many minutes passed since the last save, whichever comes
    first; on several processes process 0's clock decides for all (a save is collective).
    `clock`: seconds, monotonic (tests pass a fake one)."""

    def __init__(self, config, model_config, checkpoints: ckpt.RunCheckpoints, start: int, *,
                 evaluate: Callable[[object], dict], stop_at: Callable[[int], bool],
                 is_main: bool = True, clock: Callable[[], float] = time.monotonic):
        c = self.config = config
        self.checkpoints, self.evaluate, self.stop_at = checkpoints, evaluate, stop_at
        self.evaluate_tasks: Optional[Callable[[object], dict]] = None
        self.clock, self.stopped, self._tracing = clock, False, False
        self.t_saved = clock()
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
        self.t_last, self.steps_since, self.data_wait = time.perf_counter(), 0, 0.0
        self.profile = profile_window(c.get("profile_steps", ""))

    def run(self, state: TrainState, train_step: Callable, next_batch: Callable[[int], dict]):
        """(final state, final step): `train_step(state, next_batch(step))` until max_steps or a
        requested stop, then the final save unless that step is saved already."""
        step_ = self.start
        while step_ < self.config.max_steps and not self.stopped:
            self._profile(step_, state)
            t0 = time.perf_counter()
            batch = next_batch(step_)
            self.data_wait += time.perf_counter() - t0  # the step waits for its batch this long
            state, m = train_step(state, batch)
            step_ += 1
            self.after_step(step_, m, state)
        self._profile(step_, state, last=True)
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
        self.last_saved, self.t_saved = step, self.clock()

    def _minutes_due(self) -> bool:
        """Whether checkpoint_minutes have passed since the last save, the same on every host."""
        minutes = float(self.config.get("checkpoint_minutes", 0) or 0)
        if minutes <= 0:
            return False
        due = self.clock() - self.t_saved >= 60 * minutes
        if jax.process_count() > 1:  # hosts' clocks differ: process 0's decides
            from jax.experimental import multihost_utils
            due = bool(multihost_utils.broadcast_one_to_all(np.int32(due)))
        return due

    def after_step(self, step: int, metrics, state: TrainState):
        c = self.config
        stopping = self.stopped = self.stop_at(step)
        self.checkpoints.check_for_errors()  # a failed background save stops the run now
        self.steps_since += 1
        self.pending.append((step, metrics))
        if self.bar is None:
            self.bar = progress_bar(c.max_steps, step - 1, self.is_main)
        self.bar.update(1)
        val = None
        if c.eval_interval and (step % c.eval_interval == 0 or step == c.max_steps):
            val = self.evaluate(state.params)
        tasks = None  # lm-eval task metrics, logged with the row; never a reason to save
        if self.evaluate_tasks is not None and self.evaluate_tasks.due(step, step == c.max_steps):
            tasks = self.evaluate_tasks(state.params)
        if ((c.log_interval and step % c.log_interval == 0) or val is not None
                or tasks is not None or step == c.max_steps or stopping):
            self.log_row(step, {**(val or {}), **tasks} if tasks is not None else val)
        if (val or (c.checkpoint_interval and step % c.checkpoint_interval == 0)
                or self._minutes_due()):
            self.save(step, state, val["val_loss"] if val else None)

    def log_row(self, step: int, val: Optional[dict]):
        last = self.flush()
        now = time.perf_counter()
        steps = max(self.steps_since, 1)
        tok_s = self.steps_since * self.tokens_per_step / max(now - self.t_last, 1e-9)
        row = {"step": step, "loss": float(last["loss"]), "lr": float(last["lr"]),
               "grad_norm": float(last["grad_norm"]), "tokens": step * self.tokens_per_step,
               "tokens_per_s": tok_s, "mfu": tok_s * self.flops_per_token / self.peak,
               # per step over the log interval: wall time (evals and saves included) and the
               # part of it spent waiting for the batch
               "step_s": (now - self.t_last) / steps, "data_wait_s": self.data_wait / steps}
        self.t_last, self.steps_since, self.data_wait = now, 0, 0.0
        if val:
            row.update(val)
        self.metrics_log.write(row)
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
                              if k in ("loss", "lr", "tokens_per_s", "mfu", "val_loss", "val_bpb",
                                        "exact_match")})
        self.summary.update(row)

    def _profile(self, step: int, state, last: bool = False):
        """Start a jax.profiler trace before step START+1, stop it after step END (or at the end
        of the run), written under <run_dir>/profile (TensorBoard's profile plugin, xprof)."""
        if self.profile is None:
            return
        start, end = self.profile
        if step == start and not last and not self._tracing:
            jax.profiler.start_trace(storage.join(self.config.run_dir, "profile"))
            self._tracing = True
        elif self._tracing and (step >= end or last):
            jax.block_until_ready(state)  # the traced steps' work, not just their dispatch
            jax.profiler.stop_trace()
            self._tracing = False

    def close(self):
        if self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False
        if self.bar is not None:
            self.bar.close()
        self.checkpoints.close()
        self.metrics_log.close()


@jax.jit
def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))
