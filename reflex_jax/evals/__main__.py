"""`python -m reflex_jax.evals ...`: the CLI in reflex_jax/cli/evals.py."""
from reflex_jax.cli.evals import run

if __name__ == "__main__":
    run()
