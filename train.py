"""Train a Reflex Attention decoder.

    python train.py --config configs/tiny.py                      # the built-in default, CPU, no network
    python train.py --config configs/reflex.py --config.max_steps=2000 --config.run_dir=runs/x
    python train.py --config configs/tiny.py --dry_run            # mesh, one compiled step, memory
    python train.py ... --coordinator 10.0.0.1:1234 --num_processes 2 --process_id 0   # multi-host
    python train.py ... --multihost                   # TPU pod / SLURM: JAX finds the cluster itself

Any config field can be overridden: --config.model.n_layer=12, --config.mesh.fsdp=4, ...
A run directory that already holds checkpoints resumes from its latest step.
"""
import os
import sys

if __name__ == "__main__":  # before JAX starts: see reflex_jax/malloc_tuning.py
    from reflex_jax.malloc_tuning import tune_malloc
    tune_malloc()

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (ml_collections).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build the mesh, compile one step, print memory and "
                             "parameter shardings, and exit without training.")
_COORD = flags.DEFINE_string("coordinator", "", "Multi-host: coordinator host:port (process 0).")
_NPROC = flags.DEFINE_integer("num_processes", 0, "Multi-host: number of processes.")
_PID = flags.DEFINE_integer("process_id", -1, "Multi-host: this process's index.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Multi-host on a cluster JAX detects itself "
                               "(Cloud TPU pod, SLURM, Open MPI, Kubernetes); no other flags needed.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show full tracebacks for configuration errors.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from reflex_jax import sharding
    from reflex_jax.trainer import USER_ERRORS, Trainer  # imports only; no device is touched yet
    try:
        sharding.maybe_initialize_distributed(_COORD.value, _NPROC.value, _PID.value,
                                              auto=_MULTIHOST.value)
        trainer = Trainer(_CONFIG.value)
        if _DRY_RUN.value:
            report = trainer.dry_run()  # every process compiles; process 0 prints
            if trainer.is_main:
                print(report)
            return
        summary = trainer.train()
    except USER_ERRORS as e:
        if _TRACEBACK.value:
            raise
        print(f"error: {e}", file=sys.stderr)
        _exit_after_error()
    if trainer.is_main:
        run = summary["run_dir"]
        how = f"stopped by {summary['stopped_by']}" if summary["stopped_by"] else "finished"
        extra = "".join(f", {k} {summary[k]:.4g}" for k in ("loss", "val_loss", "exact_match")
                        if k in summary)
        print(f"{how} at step {summary['final_step']}{extra}.\n"
              f"checkpoints: {summary['checkpoint_dir']}\n"
              f"sample:      python sample.py --run {_short(run)} --prompt \"...\"")


def _exit_after_error():
    """Exit 2. Multi-host: when every process failed alike (config errors do) they leave together;
    otherwise don't wait in JAX's shutdown barrier for peers that are still running (minutes)."""
    from jax._src import distributed  # the client's barrier takes a timeout; the public one does not
    client = distributed.global_state.client
    if client is not None:
        try:
            client.wait_at_barrier("reflex_jax_user_error", 30_000)
        except Exception:  # noqa: BLE001 - some peer did not fail
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
    sys.exit(2)


def _short(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


if __name__ == "__main__":
    app.run(main)
