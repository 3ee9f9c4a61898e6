"""Sample from a train.py run or a convert_weights.py directory: `python sample.py --run DIR
--prompt TEXT` (see --help and reflex_jax/cli/sample.py)."""
if __name__ == "__main__":
    from reflex_jax.cli.sample import run
    run()  # restarts once with tuned malloc before JAX starts: see reflex_jax/malloc_tuning.py
