"""Compare reflex schedules over seeds at equal data, steps, tokens and optimizer; write
results.md, results.json and plots (reflex_lab/compare/ has the details, docs/experiments.md the
experiments).

    python compare.py --config configs/tiny.py --schedules none,all,recent:2,1 --seeds 0,1,2 \
        --config.max_steps=300 --out experiments/tiny_arith
    python compare.py ... --plan          # each run and whether it is new, partial or finished
    python compare.py ... --report_only   # rebuild the report from the runs on disk
    python compare.py --config configs/tiny.py --schedules all --seeds 0 \
        --variant pretrained:init_from=weights/x --variant random: --out experiments/init

Runs go to runs/compare/<basename of --out>/<schedule>-s<seed> (--runs_dir to change); finished runs
are reused, interrupted ones resume.
"""
if __name__ == "__main__":
    from reflex_lab.compare.cli import run
    run()  # restarts once with tuned malloc before JAX starts: see reflex_jax/malloc_tuning.py
