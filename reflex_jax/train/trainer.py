"""The training run: data, mesh and shardings, the compiled steps, evaluation, checkpoints and
the loop. The step functions themselves are pure and live in train/step.py.

The global batch at step s is a pure function of (seed, s), so a resumed run repeats exactly what
an uninterrupted run would have done.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import signal
import time
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import checkpoint as ckpt
from .. import data as data_lib
from .. import sharding, storage
from ..errors import TrainingError
from ..kernels import DEFAULT, KernelChoices
from ..model import Decoder, abstract_params, param_logical_axes, route_metrics
from ..run_config import model_config_from
from . import checks, evals, step
from .loop import TrainLoop
from .run_lock import RunLock
from .step import StepSettings, TrainState


class Trainer:
    def __init__(self, config, *, log: Callable[[str], None] = print, devices=None,
                 kernels: KernelChoices = DEFAULT, compile_only: bool = False):
        """`devices`: the devices to build the mesh over (default: all, on every process);
        `kernels`: which optimised kernels the model and loss use (bench.py's ablation); their
        platform defaults to the mesh's. `compile_only`: build from shapes alone, for a dry run
        (possibly for deviceless accelerator `devices`): no data is opened and `train` refuses."""
        self.config, c = config, config
        self.compile_only = compile_only
        self.is_main = jax.process_index() == 0
        self.log = log if self.is_main else (lambda s: None)  # process 0 speaks for the job
        self.cfg = model_config_from(config)
        checks.check_run_config(c)
        if not compile_only:
            self.data, self.data_dir = self._open_data()
            checks.check_fits_data(self.data.meta, self.cfg, self.data_dir)
            data_lib.check_token_range(self.data, self.cfg.vocab_size)
        self.mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
        checks.check_fits_mesh(c, sharding.batch_shards(self.mesh))
        self.platform = self.mesh.devices.flat[0].platform
        # the step's kernels are the mesh's platform's, and the TPU kernel's shard_map needs the mesh
        self.kernels = dataclasses.replace(kernels, platform=kernels.platform or self.platform,
                                           mesh=kernels.mesh or self.mesh)
        self.seq_len = self.cfg.block_size
        self.model = Decoder(self.cfg, remat=bool(c.remat), kernels=self.kernels)
        from .optim import make_optimizer
        self.tx, self.schedule = make_optimizer(c.optim, c.max_steps)
        self.step_settings = StepSettings(self.model, c.data.loss_on, c.grad_accum, c.seed,
                                          self.kernels)
        self._build_shardings()
        self._exact_match = self._val = None
        if not compile_only:
            self._open_loaders()
        self.train_step = self._compile_train_step()
        self.eval_step = self._compile_eval_step()
        self._stop_signal: Optional[str] = None

    def _open_loaders(self):
        c = self.config
        # each process loads the rows its own devices hold (all of them if the batch axes stay
        # inside one host); the global batch is still a pure function of (seed, step)
        block, blocks = sharding.process_rows(self.batch_sharding, c.batch_size)
        self.train_loader = data_lib.BatchLoader(self.data, "train", c.batch_size, self.seq_len,
                                                 c.seed, process_index=block, process_count=blocks)
        self.log(self.train_loader.summary())  # long rows and what the windows reach
        if c.data.task and c.eval_exact_match > 0 and c.eval_interval:
            self._exact_match = self._make_exact_match()

    def _open_data(self):
        c = self.config
        if c.data.dir:
            if storage.is_remote(c.data.dir):
                raise TrainingError(
                    f"data directory {c.data.dir!r} is remote, but token data is memory-mapped from "
                    "a local disk; copy it to each host and point --config.data.dir there.")
            if not os.path.isdir(c.data.dir):
                raise TrainingError(
                    f"data directory {c.data.dir!r} does not exist; prepare it with "
                    f"`python -m reflex_jax.data prepare --out {c.data.dir} ...` or set --config.data.dir.")
            return data_lib.TokenData.open(c.data.dir), c.data.dir
        if c.data.task:
            # token data is memory-mapped, so a run in a bucket keeps its task data on each host's
            # disk, where every process generates it (deterministic in the seed)
            remote = storage.is_remote(c.run_dir)
            root = storage.local_cache_dir(c.run_dir) if remote else c.run_dir
            out = os.path.join(root, "data")
            if self.is_main or remote:
                data_lib.prepare_task(c.data.task, out, tokenizer=c.data.tokenizer,
                                      n_train=c.data.task_rows, n_val=c.data.task_val_rows,
                                      seed=c.seed, verbose=self.is_main, **_task_options(c.data))
            _sync("prepared task data")
            return data_lib.TokenData.open(out), out
        raise TrainingError("no training data: set --config.data.dir to a prepared directory or "
                            "--config.data.task to a built-in task.")

    # ---- shardings and compiled functions ---------------------------------------------------
    def _build_shardings(self):
        mesh = self.mesh
        self.abstract_params = abstract_params(self.cfg)
        self.param_shardings = sharding.shardings_for(param_logical_axes(self.cfg),
                                                      self.abstract_params, mesh)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        self.opt_shardings = sharding.like_params(abstract_opt, self.abstract_params,
                                                  self.param_shardings, mesh)
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.state_shardings = TrainState(step=self.replicated, params=self.param_shardings,
                                          opt_state=self.opt_shardings)
        self.abstract_state = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
                       opt_state=abstract_opt), self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(mesh)

    def _with_rules(self, fn):
        """`fn` traced under this mesh's logical-axis rules."""
        rules = sharding.logical_rules_for_flax(self.mesh)

        @functools.wraps(fn)
        def wrapped(*args):
            with nn.logical_axis_rules(rules):
                return fn(*args)
        return wrapped

    def _compile_train_step(self):
        fn = functools.partial(step.train_step, self.step_settings, self.tx, self.schedule)
        return jax.jit(self._with_rules(fn),
                       in_shardings=(self.state_shardings, self.batch_sharding, self.batch_sharding),
                       out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))

    def _compile_eval_step(self):
        # the sums of train/evals.py (loss, bytes, answer loss) in one pass; the byte table is a
        # constant of the compiled function
        table = evals.run_byte_lengths(getattr(self, "data", None), self.cfg.vocab_size)
        fn = functools.partial(evals.eval_sums, self.step_settings, table)
        return jax.jit(self._with_rules(fn),
                       in_shardings=(self.param_shardings,) + (self.batch_sharding,) * 3,
                       out_shardings=self.replicated)

    def init_state(self, params=None) -> TrainState:
        """Fresh state created directly with its shardings (no full copy on one device)."""
        rng = jax.random.PRNGKey(self.config.seed)
        make = functools.partial(step.init_state, self.model, self.tx)
        if params is None:
            return jax.jit(make, out_shardings=self.state_shardings)(rng)
        params = jax.device_put(params, self.param_shardings)
        return jax.jit(make, out_shardings=self.state_shardings)(rng, params)

    def put_batch(self, local: dict, keys=("tokens", "mask"), global_rows: Optional[int] = None):
        """Global arrays from this process's rows of the batch (see `sharding.process_rows`)."""
        arrays = []
        rows = global_rows or self.config.batch_size
        _, blocks = sharding.process_rows(self.batch_sharding, rows)
        for k in keys:
            x = np.asarray(local[k], np.int32 if k == "tokens" else np.float32)
            if x.shape[0] * blocks != rows:
                raise TrainingError(f"this process fed {x.shape[0]} rows but its block of a "
                                    f"{rows}-row batch has {rows // blocks}.")
            shape = (rows,) + x.shape[1:]
            arrays.append(jax.make_array_from_process_local_data(self.batch_sharding, x, shape))
        return arrays

    def dry_run(self, target=None) -> tuple[str, dict]:
        """Compile the train and eval steps and sampling's prefill and decode step for this mesh
        (`target`: the reflex_jax.targets.Target its devices came from, for the chip's figures);
        returns (the report for people, the same as a JSON-able dict)."""
        from .dry_run import format_report, report
        rep = report(self, target, self.log)
        return format_report(self, rep), rep

    # ---- evaluation --------------------------------------------------------------------------
    def val_batches(self):
        if self._val is None:
            c = self.config
            rows = c.batch_size // c.grad_accum if c.grad_accum > 1 else c.batch_size
            self._val = data_lib.val_batches(self.data, rows, self.seq_len, c.eval_batches)
        return self._val

    def evaluate(self, params) -> dict:
        sums = []
        for b in self.val_batches():
            tokens, mask, valid = self.put_batch(self._local_rows(b), ("tokens", "mask", "valid"),
                                                 global_rows=b["tokens"].shape[0])
            sums.append(self.eval_step(params, tokens, mask, valid))
        out = evals.val_metrics(sums, answers=evals.has_answers(self.data.meta))
        out.update(route_metrics(self.cfg, params))  # `route` plans: the learned route weights
        if self.config.data.task and self.config.eval_exact_match > 0:
            out.update(self.exact_match(params))
        return out

    def _local_rows(self, batch: dict) -> dict:
        n = batch["tokens"].shape[0]
        if n % sharding.batch_shards(self.mesh):
            raise TrainingError(f"validation batch of {n} rows does not split over mesh data*fsdp = "
                                f"{sharding.batch_shards(self.mesh)}; use a batch_size divisible by it.")
        block, blocks = sharding.process_rows(self.batch_sharding, n)
        k = n // blocks
        return {key: v[block * k:(block + 1) * k] for key, v in batch.items()}

    def _make_exact_match(self):
        from .exact_match import ExactMatch
        return ExactMatch(self.data, self.cfg, self.config.data.task, self.config.eval_exact_match)

    def exact_match(self, params) -> dict:
        """Greedy answers to held-out task questions, scored by the task's exact-match rule."""
        if self._exact_match is None:
            self._exact_match = self._make_exact_match()
        return self._exact_match(params, self.mesh)

    # ---- run directory -------------------------------------------------------------------------
    def _write_run_files(self):
        c = self.config
        storage.makedirs(c.run_dir)
        model_path = storage.join(c.run_dir, ckpt.MODEL_CONFIG)
        resuming = storage.isdir(storage.join(c.run_dir, ckpt.CHECKPOINTS))
        if storage.exists(model_path):
            diff = self.cfg.model_differences(ckpt.read_model_config(c.run_dir))
            if diff and resuming:
                raise TrainingError(
                    f"run_dir {c.run_dir!r} holds checkpoints of a different model (model.{diff[0]} "
                    f"differs); use a new --config.run_dir or the same model config to resume.")
        fingerprint = data_lib.data_fingerprint(self.data)
        if resuming:
            self._check_same_data(fingerprint)
        self._previous_config = _read_json_or_none(storage.join(c.run_dir, "config.json"))
        # every process checks (same files, same verdict); only process 0 writes, since two
        # writers racing on the same temp file would break the atomic replace
        if self.is_main:
            ckpt.write_json(model_path, self.cfg.to_dict())
            ckpt.write_json(storage.join(c.run_dir, "config.json"), c.to_dict())
            ckpt.write_json(storage.join(c.run_dir, ckpt.META),
                            {"tokenizer": self.data.meta["tokenizer"],
                             "data_dir": os.path.abspath(self.data_dir),
                             "data_fingerprint": fingerprint,
                             "template": self.data.meta.get("template"), "task": c.data.task or None})
        _sync("run files written")

    def _check_same_data(self, fingerprint: str):
        """Resuming on other data than the run was trained on refuses, unless asked."""
        c = self.config
        before = ckpt.read_meta(c.run_dir).get("data_fingerprint")
        if before is None or before == fingerprint:
            return
        if not c.data.get("resume_on_changed_data", False):
            raise TrainingError(
                f"run_dir {c.run_dir!r} was trained on data with fingerprint {before} but "
                f"{self.data_dir!r} now holds data with fingerprint {fingerprint}; resume on the "
                "data it was trained on, use a new --config.run_dir, or pass "
                "--config.data.resume_on_changed_data=True.")
        self.log(f"resuming on changed data (fingerprint {before} -> {fingerprint}), as asked")

    def _record_config(self, start_step: int):
        """Log what a resumed run changed, and keep every config the run ran with
        (config_history.json: one entry per start)."""
        c, before = self.config, self._previous_config
        changed = {}
        if before is not None and start_step > 0:
            old, new = _flatten(before), _flatten(json.loads(json.dumps(c.to_dict(), default=str)))
            changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
                       if old.get(k) != new.get(k)}
            if changed:
                self.log("resuming with changed settings: " + "; ".join(
                    f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        if not self.is_main:
            return
        path = storage.join(c.run_dir, "config_history.json")
        history = _read_json_or_none(path) or []
        history.append({"start_step": start_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "changed": changed, "config": c.to_dict()})
        ckpt.write_json(path, history)

    def _restore_or_init(self, checkpoints: ckpt.RunCheckpoints) -> TrainState:
        c = self.config
        if checkpoints.latest_step() is not None:  # the newest intact step (damaged ones: skipped)
            step, params, opt = checkpoints.restore_intact(self.abstract_state.params,
                                                           self.abstract_state.opt_state, self.log)
            self.log(f"resuming {c.run_dir} from step {step}")
            return TrainState(step=jax.device_put(jnp.int32(step), self.replicated),
                              params=params, opt_state=opt)
        if c.init_from:
            from .restore import load_init_params
            params = load_init_params(c.init_from, self.cfg, self.abstract_state.params)
            self.log(f"initialised params from {c.init_from}")
            return self.init_state(params)
        return self.init_state()

    # ---- the loop ----------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop_signal = signal.Signals(signum).name

    def train(self) -> dict:
        """Train from the latest checkpoint (or `init_from`, or scratch) to max_steps, or until
        SIGTERM/SIGINT; returns a summary of the last logged metrics."""
        c = self.config
        if self.compile_only:
            raise TrainingError("this Trainer was built with compile_only=True (no data); build "
                                "it without compile_only to train.")
        lock = None
        if self.is_main and not storage.is_remote(c.run_dir):  # one trainer per local run_dir
            os.makedirs(c.run_dir, exist_ok=True)
            lock = RunLock(c.run_dir, self.log)
        with lock or contextlib.nullcontext():
            return self._train()

    def _train(self) -> dict:
        c = self.config
        self._write_run_files()
        checkpoints = ckpt.RunCheckpoints(c.run_dir, keep=c.keep_checkpoints,
                                          async_save=bool(c.async_checkpoints),
                                          track_best=bool(c.eval_interval))
        try:
            state = self._restore_or_init(checkpoints)
        except BaseException:
            checkpoints.close()  # no orbax thread left behind to print at exit
            raise
        start = int(state.step)
        self._record_config(start)
        loop = TrainLoop(self, checkpoints, start)
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        step_ = start
        try:
            while step_ < c.max_steps and self._stop_signal is None:
                tokens, mask = self.put_batch(self.train_loader.batch(step_))
                state, m = self.train_step(state, tokens, mask)
                step_ += 1
                loop.after_step(step_, m, state)
            if step_ != loop.last_saved:  # final (or signal-stop) save, unless saved already
                summary = loop.summary
                loop.save(step_, state, summary.get("val_loss") if summary.get("step") == step_ else None)
        finally:
            loop.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        loop.summary.update({"final_step": step_, "checkpoint_dir": checkpoints.directory,
                             "stopped_by": self._stop_signal})
        self.state = state
        return loop.summary


def _read_json_or_none(path: str):
    try:
        return json.loads(storage.read_text(path)) if storage.exists(path) else None
    except ValueError:  # a damaged file from an earlier start: history starts afresh
        return None


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _task_options(data_cfg) -> dict:
    """The config's task options that the chosen task has (the config lists every task's options)."""
    from ..data import get_task
    known = get_task(data_cfg.task).defaults
    return {k: v for k, v in dict(data_cfg.task_options).items() if k in known}


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
