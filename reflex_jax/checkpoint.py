"""Orbax checkpoints on a local disk or in a bucket (gs://...; orbax and tensorstore write there
directly, the JSON files go through reflex_jax.storage).

Two layouts, both loadable by `load_params(path) -> (ModelConfig, params)`:

* a **params directory** (what `convert_weights.py` writes): `model_config.json`, `meta.json`
  (free-form provenance, e.g. the tokenizer) and `params/` (an orbax StandardCheckpointer tree);
* a **run directory** (what `train.py` writes): `model_config.json`, `meta.json`, `config.json` and
  `checkpoints/<step>/` managed by orbax's CheckpointManager (see `RunCheckpoints`).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Optional

import jax
import orbax.checkpoint as ocp

from . import storage
from .checksums import StepChecksums
from .errors import CheckpointError
from .model.config import ModelConfig

MODEL_CONFIG = "model_config.json"
META = "meta.json"
PARAMS = "params"
CHECKPOINTS = "checkpoints"


def write_json(path: str, obj: Any) -> None:
    """Local or remote; atomic: a reader never sees half a file."""
    storage.write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def read_model_config(directory: str) -> ModelConfig:
    path = storage.join(directory, MODEL_CONFIG)
    if not storage.exists(path):
        raise CheckpointError(f"{directory!r} has no {MODEL_CONFIG}; point at a directory written "
                              "by convert_weights.py or train.py.")
    return ModelConfig.from_dict(json.loads(storage.read_text(path)))


def read_checkpoint_meta(directory: str) -> dict:
    path = storage.join(directory, META)
    if not storage.exists(path):
        return {}
    return json.loads(storage.read_text(path))


def check_params_fit(cfg: ModelConfig, params, where: str) -> None:
    """Raise one sentence naming the first parameter whose presence or shape differs from `cfg`."""
    from .model import abstract_params
    want = {jax.tree_util.keystr(k): v.shape for k, v in
            jax.tree_util.tree_leaves_with_path(abstract_params(cfg))}
    have = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in
            jax.tree_util.tree_leaves_with_path(params)}
    for name, shape in want.items():
        if name not in have:
            raise CheckpointError(f"checkpoint {where!r} lacks parameter {name} that the model "
                                  "config needs; it was written for a different architecture.")
        if tuple(have[name]) != tuple(shape):
            raise CheckpointError(f"checkpoint {where!r}: parameter {name} has shape {have[name]} "
                                  f"but the model config needs {tuple(shape)}; use the model config "
                                  "saved with the checkpoint or convert the weights again.")
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointError(f"checkpoint {where!r} has parameter {extra[0]} that the model config "
                              "does not use; it was written for a different architecture.")


def save_params(directory: str, cfg: ModelConfig, params, meta: Optional[dict] = None) -> str:
    """Write a params directory (orbax tree + model config + meta). Returns the directory."""
    directory = storage.resolve(directory)
    storage.makedirs(directory)
    target = storage.join(directory, PARAMS)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(target, params, force=True)
    ckptr.wait_until_finished()
    write_json(storage.join(directory, MODEL_CONFIG), cfg.to_dict())
    write_json(storage.join(directory, META), meta or {})
    return directory


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def _reason(e: BaseException) -> str:
    """The first line of the innermost cause of `e` (orbax wraps tensorstore wraps the OS)."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {text[:200]}"


def restore_tree(path: str, abstract_tree=None):
    """Restore an orbax StandardCheckpointer tree (onto `abstract_tree`'s shardings if given)."""
    ckptr = ocp.StandardCheckpointer()
    if abstract_tree is None:
        return ckptr.restore(path)
    return ckptr.restore(path, abstract_tree)


def load_params(path: str, step: Optional[int] = None, which: str = "best",
                log: Callable[[str], None] = _note):
    """(ModelConfig, params) from a params directory or a run directory.

    For a run directory: `step` picks a specific saved step; otherwise `which` is `best` (lowest
    validation loss, falling back to latest when no eval ran) or `latest`, and a damaged step
    falls back to the newest intact one, saying so through `log`. A LoRA run's params are its
    base's with the step's adapters merged (train/lora.py).
    """
    path = storage.resolve(path)
    if not storage.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist; pass a directory "
                              "written by convert_weights.py or train.py.")
    cfg = read_model_config(path)
    if storage.isdir(storage.join(path, PARAMS)):
        params = restore_tree(storage.join(path, PARAMS))
        check_params_fit(cfg, params, path)
        return cfg, params
    if storage.isdir(storage.join(path, CHECKPOINTS)):
        ckpts = RunCheckpoints(path, read_only=True)
        try:
            chosen, params = ckpts.restore_params_intact(step, which, log)
        finally:
            ckpts.close()
        from .train import lora
        ref = lora.read_reference(path)
        if ref is not None:  # a LoRA run's steps hold adapters: merged into its base
            return cfg, lora.merged_run_params(cfg, path, params, ref, f"{path} step {chosen}")
        check_params_fit(cfg, params, f"{path} step {chosen}")
        return cfg, params
    raise CheckpointError(f"{path!r} holds neither params/ nor checkpoints/; it is not a "
                          "converted-weights or run directory.")


class _NoUntrackedSaveWarning(logging.Filter):
    """Orbax warns at every save without metrics while it tracks the best step; saves between
    evals have none by design (their step is kept by the latest-N rule)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Requested `tracked_metric`; did not provide metrics" not in record.getMessage()


_UNTRACKED_SAVE = _NoUntrackedSaveWarning()


class RunCheckpoints:
    """`<run_dir>/checkpoints/<step>/{params,opt}`: orbax CheckpointManager with keep-last-N plus
    the best step by validation loss (`track_best`).

    Params and optimizer state are separate items, so sampling restores params alone. Orbax writes
    each step into a temporary directory and renames it only once complete (in a bucket, where a
    rename is a copy: writes in place and adds commit_success.txt last), so a process killed
    mid-save leaves no step that `latest_step` would return. Once a step is complete its files'
    checksums are written (checksums.py) and a restore verifies them: verified steps are preferred,
    a damaged step is skipped for the next one, and an unverified step is used only when no
    verified one restores, saying so. A save that fails raises one sentence naming the step and
    what is still intact.

    `read_only=True` (sampling, export, evaluation, `init_from`): nothing in the run directory is
    written, moved or deleted (no temp-directory cleanup, no renamed metrics, no checksum files),
    so a reader can never break a trainer that is saving into it; it sees committed steps only.
    """

    def __init__(self, run_dir: str, keep: int = 3, async_save: bool = True,
                 read_only: bool = False, track_best: bool = True):
        self.directory = storage.join(storage.resolve(run_dir), CHECKPOINTS)
        self.read_only = read_only
        if read_only and not storage.isdir(self.directory):
            raise CheckpointError(f"{run_dir!r} has no {CHECKPOINTS}/ directory; train first or "
                                  "point at a run directory that has checkpoints.")
        self.sums = None if storage.is_remote(self.directory) else StepChecksums(self.directory)
        self._unsealed: list[int] = []  # saved steps whose checksums are not written yet
        if not read_only:
            self._set_aside_unreadable_metrics()
        try:
            self.manager = self._manager(keep, async_save, track_best)
        except Exception as e:  # noqa: BLE001 - whatever else orbax cannot read
            raise CheckpointError(f"could not open the checkpoints in {self.directory} "
                                  f"({_reason(e)}); restore the files or start a new "
                                  "--config.run_dir.") from None

    def _set_aside_unreadable_metrics(self) -> None:
        """Orbax reads every step's metrics file when it opens the directory, and one that is not
        JSON fails it for all steps: rename such a file (keeping its bytes), so that step counts
        as damaged and the others stay usable."""
        if storage.is_remote(self.directory) or not os.path.isdir(self.directory):
            return
        for path in glob.glob(os.path.join(self.directory, "*", "metrics", "metrics")):
            try:
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            except (OSError, ValueError):
                os.replace(path, path + ".unreadable")
                _note(f"{path} is not JSON; renamed it to metrics.unreadable")

    def _manager(self, keep: int, async_save: bool, track_best: bool):
        from orbax.checkpoint.checkpoint_managers import AnyPreservationPolicy, BestN, LatestN
        if self.read_only:  # lightweight: orbax reads no metrics (best_step reads them itself)
            options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                   cleanup_tmp_directories=False,
                                                   enable_async_checkpointing=False,
                                                   lightweight_initialize=True,
                                                   save_interval_steps=0)
            # orbax warns that the directory is read-only: what a reader asked for
            absl = logging.getLogger("absl")
            level = absl.level
            absl.setLevel(logging.ERROR)
            try:
                return ocp.CheckpointManager(self.directory, options=options)
            finally:
                absl.setLevel(level)
        policies = [LatestN(max(1, keep))]
        best = {}
        if track_best:  # without evals there are no metrics (and orbax warns at every save)
            metric = lambda m: m["val_loss"]  # noqa: E731
            policies.append(BestN(get_metric_fn=metric, reverse=True, n=1,
                                  keep_checkpoints_without_metrics=False))
            best = dict(best_fn=metric, best_mode="min")
        options = ocp.CheckpointManagerOptions(
            preservation_policy=AnyPreservationPolicy(policies), enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True, create=True, **best)
        return ocp.CheckpointManager(self.directory, options=options)

    # ---- saving ------------------------------------------------------------------------------
    def save(self, step: int, params, opt_state, val_loss: Optional[float] = None) -> None:
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; open it with "
                                  "read_only=False to save.")
        self._finish_pending()
        if not storage.is_remote(self.directory):
            _check_space(self.directory, step, (params, opt_state), self._intact_text)
        metrics = None if val_loss is None else {"val_loss": float(val_loss)}
        if _UNTRACKED_SAVE not in logging.getLogger("absl").filters:
            logging.getLogger("absl").addFilter(_UNTRACKED_SAVE)
        try:
            self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                            opt=ocp.args.StandardSave(opt_state)),
                              metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - storage errors of every kind, named below
            raise self._save_failed(step, e) from None
        self._unsealed.append(step)
        if not self.manager.is_saving_in_progress():  # a synchronous save: verified at once
            self._seal()

    def _intact_text(self) -> str:
        try:
            steps = self.all_steps()
        except Exception:  # noqa: BLE001 - listing a broken directory
            steps = []
        return (f"steps {', '.join(map(str, steps))} are intact" if steps
                else "no earlier step was saved")

    def _save_failed(self, step, e: BaseException) -> CheckpointError:
        return CheckpointError(f"saving checkpoint step {step} in {self.directory} failed "
                               f"({_reason(e)}); {self._intact_text()}; free space or fix the "
                               "storage, then run again to resume.")

    def _finish_pending(self) -> None:
        """Wait for the async save in flight, raise if it failed, checksum the finished steps."""
        if self.read_only:
            return
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(self._unsealed[-1] if self._unsealed else "?", e) from None
        self._seal()

    def _seal(self) -> None:
        """Checksum the saved steps (their saves have finished)."""
        if self.sums is not None and jax.process_index() == 0:  # one writer on a shared disk
            present = set(self.manager.all_steps())
            for step in self._unsealed:
                if step in present:
                    try:
                        self.sums.write(step)
                    except OSError as e:
                        self._unsealed = []
                        raise CheckpointError(
                            f"writing the checksums of checkpoint step {step} in "
                            f"{self.sums.directory} failed ({_reason(e)}); the step is saved but "
                            "unverified (a resume prefers a verified step); free space or fix "
                            "the storage, then run again to resume.") from None
            self.sums.keep_only(present)
        self._unsealed = []

    def check_for_errors(self) -> None:
        """Raise now (one sentence) if a background save has failed; checksum the steps whose
        save has finished (so a step is verified soon after it is written, not at the next
        save: a run killed in between would resume from the step before)."""
        try:
            self.manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._save_failed(self._unsealed[-1] if self._unsealed else "?", e) from None
        if self._unsealed and not self.manager.is_saving_in_progress():
            self._seal()  # no wait: nothing is in flight (and a wait may be collective)

    # ---- which steps -------------------------------------------------------------------------
    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        if self.read_only:
            return _best_from_metrics(self.directory, self.all_steps())
        try:
            return self.manager.best_step()
        except Exception:  # noqa: BLE001 - unreadable metrics of some step: no "best"
            return None

    def verified(self, step: int) -> bool:
        """Whether `step` has its checksums (a bucket's objects are checked by the storage)."""
        return self.sums is None or self.sums.unverified_reason(step) is None

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def pick_step(self, step: Optional[int] = None, which: str = "best") -> int:
        return self._candidates(step, which)[0]

    def _candidates(self, step: Optional[int], which: str) -> list[int]:
        """Steps to try, in order: `_preferred`'s, the verified ones first."""
        return self._verified_first(self._preferred(step, which))

    def _preferred(self, step: Optional[int], which: str) -> list[int]:
        """The one asked for, else best/latest and then the older ones."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"{self.directory!r} holds no finished checkpoint; train longer "
                                  "(config.checkpoint_interval) or pick another run directory.")
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"step {step} is not saved in {self.directory!r}; saved steps: "
                                      f"{', '.join(map(str, steps))}.")
            return [step]
        if which not in ("best", "latest"):
            raise CheckpointError(f"which={which!r} must be 'best' or 'latest'.")
        best = self.best_step() if which == "best" else None
        first = best if best is not None else steps[-1]
        return [first] + [s for s in reversed(steps) if s != first]

    def _verified_first(self, order: list[int]) -> list[int]:
        """`order` with the verified steps first: an unverified one only when none restores."""
        verified = {s: self.verified(s) for s in order}
        return [s for s in order if verified[s]] + [s for s in order if not verified[s]]

    def _say_passed_over(self, wanted: int, chosen: int, log: Callable) -> None:
        if chosen != wanted and not self.verified(wanted) and self.verified(chosen):
            log(f"checkpoint step {wanted} in {self.directory} is unverified "
                f"({self.sums.unverified_reason(wanted)}); restored the verified step {chosen}")

    # ---- restoring ---------------------------------------------------------------------------
    def _restore_checked(self, step: int, restore: Callable, log: Callable):
        """`restore()` of `step` after its checksums; a CheckpointError names the damage, and an
        unverified step is restored saying so."""
        problem = self.sums.problem(step) if self.sums is not None else None
        if problem is None:
            try:
                out = restore()
            except Exception as e:  # noqa: BLE001 - truncated chunks, missing items, ...
                problem = _reason(e)
            else:
                if not self.verified(step):
                    log(f"restored checkpoint step {step} in {self.directory} unverified "
                        f"({self.sums.unverified_reason(step)}): no verified step restores")
                return out
        raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged ({problem})")

    def restore_intact(self, abstract_params, abstract_opt_state, log: Callable = _note):
        """(step, params, opt_state) of the newest verified intact step, else the newest intact
        one (see the class docstring); newer steps are set aside (training saves them again)."""
        newest_first = list(reversed(self.all_steps()))
        step, (params, opt) = _first_intact(
            self.directory, self._verified_first(newest_first),
            lambda s: self._restore_checked(s, lambda: self.restore(s, abstract_params,
                                                                    abstract_opt_state), log), log)
        self._say_passed_over(newest_first[0], step, log)
        newer = [s for s in self.all_steps() if s > step]
        if newer and not storage.is_remote(self.directory):
            from .sharding import sync_processes
            why = {s: "unverified" for s in newer if not self.verified(s)}
            sync_processes("every process chose its step")  # before any file moves
            if jax.process_index() == 0:  # one mover on a shared disk
                _set_aside(self.directory, newer, log, why)
            sync_processes("newer steps set aside")
            self.manager.reload()
        return step, params, opt

    def restore_params_intact(self, step: Optional[int] = None, which: str = "best",
                              log: Callable = _note, abstract_params=None):
        """(step, params): the step asked for, else best/latest, else the newest intact one,
        verified steps first."""
        candidates = self._candidates(step, which)
        chosen, params = _first_intact(
            self.directory, candidates,
            lambda s: self._restore_checked(s, lambda: self.restore_params(s, abstract_params), log),
            log)
        self._say_passed_over(self._preferred(step, which)[0], chosen, log)
        return chosen, params

    def restore(self, step: int, abstract_params, abstract_opt_state):
        """(params, opt_state) at `step`, placed like the abstract trees' shardings."""
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt=ocp.args.StandardRestore(abstract_opt_state)))
        return out["params"], out["opt"]

    def restore_params(self, step: int, abstract_params=None):
        restore = ocp.args.StandardRestore(abstract_params)
        return self.manager.restore(step, args=ocp.args.Composite(params=restore))["params"]

    def wait(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        try:
            self._finish_pending()
        finally:
            # orbax's close() does not wait for the temporary-directory cleanup it starts when it
            # opens a directory; a process exiting right after would print that thread's failure
            await_cleanup = getattr(self.manager, "_maybe_await_cleanup_tmp_directory", None)
            if await_cleanup is not None and not self.read_only:
                await_cleanup()
            self.manager.close()


def _check_space(directory: str, step: int, trees, intact_text: Callable[[], str]) -> None:
    """Refuse a save that cannot fit on a local disk, before writing anything."""
    need = sum(x.nbytes for x in jax.tree_util.tree_leaves(trees)) // max(jax.process_count(), 1)
    os.makedirs(directory, exist_ok=True)
    free = shutil.disk_usage(directory).free
    if free < need:
        raise CheckpointError(
            f"not enough disk space to save step {step} in {directory}: it needs about "
            f"{need / 2**20:,.0f} MiB and {free / 2**20:,.0f} MiB are free; "
            f"{intact_text()}; free space or use another --config.run_dir.")


def _first_intact(directory: str, candidates: list[int], restore: Callable, log: Callable):
    """(step, restore(step)) of the first candidate whose restore raises no CheckpointError,
    saying which damaged steps were passed over."""
    damaged = []
    for step in candidates:
        try:
            out = restore(step)
        except CheckpointError as e:
            if len(candidates) == 1:
                raise CheckpointError(f"{e}; restore another step or remove it.") from None
            damaged.append(step)
            log(f"{e}; trying the next older step")
            continue
        if damaged:
            log(f"restored step {step} instead of the damaged step(s) "
                f"{', '.join(map(str, damaged))}")
        return step, out
    raise CheckpointError(f"every checkpoint in {directory} is damaged (steps "
                          f"{', '.join(map(str, damaged))}); start a new --config.run_dir or "
                          "restore the files.")


def _set_aside(directory: str, steps: list[int], log: Callable, why: dict) -> None:
    """Move the damaged (or, `why[step]`, unverified) steps newer than the one resumed from out
    of orbax's (local) directory (training would save those steps again), to
    <run_dir>/damaged_checkpoints/: nothing is deleted."""
    aside = os.path.join(os.path.dirname(directory), "damaged_checkpoints")
    os.makedirs(aside, exist_ok=True)
    for step in steps:
        target = os.path.join(aside, f"{step}-{int(time.time())}")
        shutil.move(os.path.join(directory, str(step)), target)
        log(f"moved the {why.get(step, 'damaged')} step {step} to {target}")


def _best_from_metrics(directory: str, steps: list[int]) -> Optional[int]:
    """The step with the lowest recorded val_loss, read from each step's metrics file without
    orbax (a reader's view: an unreadable file only leaves its step out of the choice)."""
    best = None
    for step in steps:
        path = storage.join(directory, str(step), "metrics", "metrics")
        try:
            loss = float(json.loads(storage.read_text(path))["val_loss"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if best is None or loss < best[0]:
            best = (loss, step)
    return None if best is None else best[1]
