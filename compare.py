"""Compare reflex schedules over seeds at equal data, steps, tokens and optimizer; write
results.md, results.json and plots (reflex_jax/compare.py has the details).

    python compare.py --config configs/tiny.py --schedules none,all,recent:2,1 --seeds 0,1,2 \
        --config.max_steps=300 --out experiments/tiny_arith
    python compare.py ... --plan          # each run and whether it is new, partial or finished
    python compare.py ... --report_only   # rebuild the report from the runs on disk
    python compare.py --config configs/tiny.py --schedules all --seeds 0 \
        --variant pretrained:init_from=weights/x --variant random: --out experiments/init

Runs go to runs/compare/<basename of --out>/<schedule>-s<seed> (--runs_dir to change); finished runs
are reused, interrupted ones resume.
"""
import os
import sys

if __name__ == "__main__":  # before JAX starts: see reflex_jax/malloc_tuning.py
    from reflex_jax.malloc_tuning import tune_malloc
    tune_malloc()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from reflex_jax.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
