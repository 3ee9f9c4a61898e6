"""Train a Reflex Attention decoder.

    python train.py --config configs/tiny.py                      # the built-in default, CPU, no network
    python train.py --config configs/reflex.py --config.max_steps=2000 --config.run_dir=runs/x
    python train.py --config configs/tiny.py --dry_run            # mesh, compiled steps, memory
    python train.py --config configs/reflex.py --compile_for=v5p:2x2x2 --config.mesh.fsdp=8
                                                  # compile for a TPU pod / GPUs from this machine
    python train.py ... --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 0   # multi-host
    python train.py ... --multihost                   # TPU pod / SLURM: JAX finds the cluster itself

Any config field can be overridden: --config.model.n_layer=12, --config.mesh.fsdp=4, ...
A run directory that already holds checkpoints resumes from its latest step.
Exit status: 0 finished, 2 a user's mistake (one line on stderr), 75 stopped by SIGTERM/SIGINT
after saving (requeue it), 3 a dry run whose step does not fit the target's memory.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from typing import Optional, Sequence

from . import exit_on_user_error, quiet_start

PROG = "train.py"
DEFAULT_CONFIG = "configs/tiny.py"


def parse_args(argv: Optional[Sequence[str]]):
    """(flags, config overrides): every `--config.<field>` word is an override."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config file (defines get_config())")
    p.add_argument("--dry_run", action="store_true", help="build the mesh, compile the train and "
                   "eval steps and sampling, print memory, cost and parameter shardings, and exit "
                   "without training or reading data")
    p.add_argument("--compile_for", default="", help="dry run compiled for a hardware target "
                   "without the hardware: a TPU topology (v5e:2x4, v5p:2x2x1, v5p:2x2x2, v6e:2x4, "
                   "...) or gpu:h100x8, gpu:h200x8, gpu:h100x16")
    p.add_argument("--dry_run_json", default="", help="also write the dry run's figures as JSON")
    p.add_argument("--coordinator", default="", help="multi-host: coordinator host:port (process 0)")
    p.add_argument("--num_processes", type=int, default=0, help="multi-host: number of processes")
    p.add_argument("--process_id", type=int, default=-1, help="multi-host: this process's index")
    p.add_argument("--heartbeat_s", type=int, default=100,
                   help="multi-host: a process silent this many seconds (killed, its host gone) "
                        "ends the others (JAX's distributed heartbeat)")
    p.add_argument("--multihost", action="store_true", help="multi-host on a cluster JAX detects "
                   "itself (Cloud TPU pod, SLURM, Open MPI, Kubernetes); no other flags needed")
    p.add_argument("--compile_cache", default="", help="directory (or gs:// path) of JAX's "
                   "persistent compilation cache: a later run of the same program reads its "
                   "compiled steps back instead of compiling them (reflex_jax/compile_cache.py)")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks for user errors")
    return p.parse_known_args(argv)


DOES_NOT_FIT = 3  # exit status of a dry run whose compiled step does not fit the chip's memory
STOPPED = 75  # stopped by SIGTERM/SIGINT after saving, or a peer process lost: requeue (EX_TEMPFAIL)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args, rest = parse_args(argv)
    dry_run = args.dry_run or bool(args.compile_for) or bool(args.dry_run_json)
    if args.compile_for:  # before JAX starts its backends
        from ..hardware import quiet_environment
        quiet_environment()
    from absl import logging
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    with exit_on_user_error(PROG, traceback=args.traceback, exit=_exit_after_error):
        from ..run_config import load_config, split_overrides
        config = load_config(args.config, split_overrides(rest))
        if dry_run:
            sys.exit(_dry_run(config, args))
        if args.compile_cache:  # before anything compiles
            from .. import compile_cache
            compile_cache.enable(args.compile_cache)
        from .. import peer_watch, sharding
        from ..train.trainer import Trainer  # imports only; no device is touched yet
        sharding.maybe_initialize_distributed(args.coordinator, args.num_processes,
                                              args.process_id, auto=args.multihost,
                                              heartbeat_s=args.heartbeat_s)
        peer_watch.start(lambda cause: _exit_lost_peer(cause, config.run_dir))
        trainer = Trainer(config)
        try:
            summary = trainer.train()
        except Exception as e:  # noqa: BLE001 - only a lost peer is handled; the rest re-raises
            cause = sharding.lost_peer(e)
            if cause is None:
                raise
            _exit_lost_peer(cause, config.run_dir)
        peer_watch.leave()  # every process has finished or stopped at the same step
    if trainer.is_main:
        print(_summary_lines(summary))
    if summary["stopped_by"]:  # a scheduler must tell preemption from completion
        sys.exit(STOPPED)


def _dry_run(config, args) -> int:
    """Compile from shapes (for `--compile_for`'s deviceless devices, or this machine's), print
    the report (process 0), write the JSON; DOES_NOT_FIT when the chip's memory is too small."""
    from .. import sharding
    from ..train.program import TrainProgram
    target = None
    if args.compile_for:
        from ..hardware import resolve_target
        target = resolve_target(args.compile_for)
    else:  # every process of a multi-host job compiles its part of the same program
        sharding.maybe_initialize_distributed(args.coordinator, args.num_processes,
                                              args.process_id, auto=args.multihost,
                                              heartbeat_s=args.heartbeat_s)
    import jax
    program = TrainProgram(config, devices=target.devices if target else None)
    is_main = jax.process_index() == 0
    text, rep = program.dry_run(target, print if is_main else (lambda s: None))
    if is_main:
        print(text)
        if args.dry_run_json:
            from ..checkpoint import write_json
            write_json(args.dry_run_json, rep)
    return DOES_NOT_FIT if rep["fits"] is False else 0


def _summary_lines(summary: dict) -> str:
    how = f"stopped by {summary['stopped_by']}" if summary["stopped_by"] else "finished"
    extra = "".join(f", {k} {summary[k]:.4g}" for k in ("loss", "val_loss", "exact_match")
                    if k in summary)
    from .. import compile_cache
    cache = compile_cache.summary()
    return (f"{how} at step {summary['final_step']}{extra}.\n"
            f"checkpoints: {summary['checkpoint_dir']}\n"
            f"sample:      {_sample_hint(summary['run_dir'])}"
            + (f"\n{cache}" if cache else ""))


def _sample_hint(run_dir: str) -> str:
    """The sample.py command for this run, shell-quoted: with --template instruct when the run
    trained on template rows (without it the prompt is fed raw and the answer is garbage)."""
    import shlex
    from ..checkpoint import read_checkpoint_meta
    words = ["python", "sample.py", "--run", _short(run_dir)]
    try:
        meta = read_checkpoint_meta(run_dir)
    except (OSError, ValueError):  # the hint is a courtesy; the run itself is fine
        meta = {}
    if meta.get("template"):
        words += ["--template", "instruct"]
    return " ".join(shlex.quote(w) for w in words) + ' --prompt "..."'


def _exit_after_error(status: int):
    """Exit. Multi-host: when every process failed alike (config errors do) they leave together;
    otherwise don't wait in JAX's shutdown barrier for peers that are still running (minutes).
    Either way a multi-host process leaves with os._exit: after the barrier, JAX's own shutdown
    at exit would wait again, and where process 0 (which hosts the coordination service) is gone
    first, the others waited there for minutes (150 s seen)."""
    import jax
    if jax.distributed.is_initialized():
        try:
            # JAX has no public barrier with a timeout (jax.distributed has initialize,
            # is_initialized and shutdown); the coordination client's is the one way to wait 30 s
            # at most. Should a JAX release move it, this exits at once, as when a peer is running.
            from jax._src.distributed import global_state
            global_state.client.wait_at_barrier("reflex_jax_user_error", 30_000)
            from .. import peer_watch
            peer_watch.leave()  # every process failed alike; none is lost
        except Exception:  # noqa: BLE001 - some peer did not fail
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def _exit_lost_peer(cause: str, run_dir: str) -> None:
    """Another process of the job is gone: one sentence and exit STOPPED at once. Waiting would
    not help: JAX's shutdown barrier would abort this process after the heartbeat timeout with a
    page of coordination-service errors. Called from the main thread (a failed collective) or the
    peer watch's thread, whichever knows first; the lock keeps the sentence single."""
    _LOST_PEER.acquire()  # never released: a second caller waits here for os._exit
    print(f"{PROG}: error: another process of this multi-host run is gone ({cause}); start every "
          f"process again to resume {_short(run_dir)} from its last committed step.",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(STOPPED)


_LOST_PEER = threading.Lock()


def _short(path: str) -> str:
    from ..storage import is_remote
    if is_remote(path):
        return path
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a process Ctrl-C ended


def run():
    """Console-script entry (reflex-train)."""
    from ..malloc_tuning import tune_malloc
    tune_malloc()
    quiet_start()
    try:
        main()
    except KeyboardInterrupt:  # once training runs, SIGINT is a stop request instead (exit 75)
        print(f"{PROG}: interrupted by Ctrl-C before training started; nothing was trained or "
              "saved, so run the command again to start.", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # os._exit: after an interrupted compile the interpreter's shutdown crashed in XLA's
        # threads (SIGSEGV, measured); the `with` blocks (run lock, temporary dirs) have unwound
        os._exit(INTERRUPTED)
