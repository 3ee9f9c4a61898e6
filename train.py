"""Train a Reflex Attention decoder: `python train.py --config configs/tiny.py` (see --help and
reflex_jax/cli/train.py)."""
if __name__ == "__main__":
    from reflex_jax.cli.train import run
    run()  # restarts once with tuned malloc before JAX starts: see reflex_jax/malloc_tuning.py
