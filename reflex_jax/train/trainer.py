"""The training run, composed: the run's data, the compiled program (train/program.py), the run
directory's files (train/run_files.py), evaluation (train/evaluator.py), checkpoints and the loop
(train/loop.py). The step functions themselves are pure and live in train/step.py.

The global batch at step s is a pure function of (seed, s), so a resumed run repeats exactly what
an uninterrupted run would have done.
"""
from __future__ import annotations

from typing import Callable

import jax

from .. import checkpoint as ckpt
from .. import data as data_lib
from .. import sharding, storage
from ..kernels import DEFAULT, KernelChoices
from ..run_config import model_config_from
from . import checks, lora, validation
from .evaluator import Evaluator, task_evaluator
from .loop import StopRequest, TrainLoop
from .prefetch import Prefetcher
from .program import TrainProgram
from .run_data import open_data
from .run_files import RunFiles
from .run_lock import RunLock
from .step import TrainState


class Trainer:
    """`Trainer(config).train()`: train the run `config` (an ml_collections ConfigDict) from its
    latest checkpoint, `init_from`, or scratch. `devices` and `kernels` go to the TrainProgram."""

    def __init__(self, config, *, log: Callable[[str], None] = print, devices=None,
                 kernels: KernelChoices = DEFAULT):
        self._lock = None
        self.config = config
        self.is_main = jax.process_index() == 0
        self.log = log if self.is_main else (lambda s: None)  # process 0 speaks for the job
        # the config is checked before anything is touched (the program checks it again), then
        # the lock is taken: a refused trainer has not touched the run (its task data, its files)
        model_config = model_config_from(config)
        checks.check_run_config(config)
        lora.spec_from_config(config)
        if self.is_main and not storage.is_remote(config.run_dir):  # one trainer per local run_dir
            self._lock = RunLock(config.run_dir, self.log).acquire()
        try:
            self._build(config, model_config, devices, kernels)
        except BaseException:
            self.release()
            raise

    def _build(self, config, model_config, devices, kernels: KernelChoices):
        self.data, self.data_dir = open_data(config, self.is_main)
        checks.check_fits_data(self.data.meta, model_config, self.data_dir)
        data_lib.check_token_range(self.data, model_config.vocab_size)
        self.program = TrainProgram(
            config, devices=devices, kernels=kernels,
            token_bytes=validation.run_byte_lengths(self.data, model_config.vocab_size))
        # each process loads the rows its own devices hold (all of them if the batch axes stay
        # inside one host); the global batch is still a pure function of (seed, step)
        block, blocks = sharding.process_rows(self.program.batch_sharding, config.batch_size)
        self.train_loader = data_lib.BatchLoader(self.data, "train", config.batch_size,
                                                 self.program.seq_len, config.seed,
                                                 process_index=block, process_count=blocks,
                                                 documents=config.data.document_mask)
        self.log(self.train_loader.summary())  # long rows and what the windows reach
        self.evaluator = Evaluator(self.program, self.data)
        self.task_evaluator = task_evaluator(self.program, self.data)  # lm-eval tasks, or None
        self.run_files = RunFiles(config, self.program.model_config, self.is_main, self.log)
        self.state = None  # the last state of train()

    def train(self) -> dict:
        """Train to max_steps, or until SIGTERM/SIGINT; returns a summary of the last logged
        metrics (with `final_step`, `checkpoint_dir` and `stopped_by`)."""
        if self._lock is not None and not self._lock.held:  # a second train() of this Trainer
            self._lock.acquire()
        try:
            return self._train()
        finally:
            self.release()

    def release(self) -> None:
        """Give up the run directory's lock (train() does at its end)."""
        if self._lock is not None:
            self._lock.release()

    def __del__(self):
        self.release()

    def _train(self) -> dict:
        c, program = self.config, self.program
        self.run_files.write(self.data, self.data_dir)
        checkpoints = ckpt.RunCheckpoints(c.run_dir, keep=c.keep_checkpoints,
                                          async_save=bool(c.async_checkpoints),
                                          track_best=bool(c.eval_interval))
        try:
            state = self._restore_or_init(checkpoints)
        except BaseException:
            checkpoints.close()  # no orbax thread left behind to print at exit
            raise
        start = int(state.step)
        self.run_files.record_config(start)
        with StopRequest() as stop:
            evaluate = self.evaluator  # of the model's params (LoRA: the adapters merged)
            if program.lora is not None:
                evaluate = lambda p: self.evaluator(program.model_params(p))  # noqa: E731
            loop = TrainLoop(c, program.model_config, checkpoints, start, evaluate=evaluate,
                             stop_at=stop.stop_at, is_main=self.is_main)
            loop.evaluate_tasks = self.task_evaluator
            fetch = lambda s: program.put_batch(self.train_loader.batch(s))  # noqa: E731
            if c.data.get("prefetch", 0) > 0:  # read and place the next batches during the step
                fetch = Prefetcher(fetch, int(c.data.prefetch))
            try:
                state, _ = loop.run(state, program.train_step, fetch)
            finally:
                loop.close()
                if isinstance(fetch, Prefetcher):
                    fetch.close()
        loop.summary.update({"checkpoint_dir": checkpoints.directory, "stopped_by": stop.reason})
        self.state = state
        return loop.summary

    def _restore_or_init(self, checkpoints: ckpt.RunCheckpoints) -> TrainState:
        c, program = self.config, self.program
        resuming = checkpoints.latest_step() is not None
        ref = lora.check_resume(c, program.lora, resuming)  # the same LoRA settings, or none
        if program.lora is not None:  # the frozen base, placed before the adapters' state
            self._place_lora_base(ref, resuming)
        if resuming:  # the newest intact step (damaged ones: skipped)
            abstract = program.abstract_state
            step, params, opt = checkpoints.restore_intact(abstract.params, abstract.opt_state,
                                                           self.log)
            self.log(f"resuming {c.run_dir} from step {step}")
            return program.state_at(step, params, opt)
        if program.lora is not None:
            return program.init_state()
        if c.init_from:
            from .restore import load_init_params
            params = load_init_params(c.init_from, program.model_config,
                                      program.abstract_state.params)
            self.log(f"initialised params from {c.init_from}")
            return program.init_state(params)
        return program.init_state()

    def _place_lora_base(self, ref, resuming: bool) -> None:
        """Load and place a LoRA run's frozen base; a resume checks its fingerprint against the
        run's reference, a start writes the reference (train/lora.py)."""
        c, program = self.config, self.program
        params, path, step = lora.load_base(c, program.model_config,
                                            program.abstract_model_params, ref, resuming)
        program.set_frozen(params)
        del params
        fingerprint = lora.fingerprint(program.frozen)
        lora.check_fingerprint(c, ref, resuming, path, fingerprint)
        if self.is_main and (not resuming or ref.get("base") != path):
            lora.write_reference(c.run_dir, program.lora, path, step, fingerprint)
        where = path if step is None else f"{path} step {step}"
        self.log(f"LoRA rank {program.lora.rank} on {program.lora.spelling} over the frozen "
                 f"base {where} (fingerprint {fingerprint})")
