"""Speed, MFU and memory of this project side by side with PyTorch, in one process.

    python bench.py                       # default CPU config (vocab 50257, 6x8, n_embd 512,
                                          # block 256, batch 8)
    python bench.py --quick --json runs/bench_quick.json
    python bench.py --dtypes float32 --no_gen --reps 3

The command line is reflex_lab/bench/cli.py (also installed as `reflex-bench`); what is measured
and how: reflex_lab/bench/ and docs/bench.md.
"""

if __name__ == "__main__":
    from reflex_jax.cli import quiet_start
    from reflex_lab.bench.cli import run
    quiet_start()  # no plugin noise on a CPU-only machine (reflex_jax/cli/__init__.py)
    run()  # restarts once with tuned malloc before JAX starts: see reflex_jax/malloc_tuning.py
