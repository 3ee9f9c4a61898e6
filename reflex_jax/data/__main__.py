"""`python -m reflex_jax.data prepare | task | info ...`: the CLI in reflex_jax/cli/data.py."""
from reflex_jax.cli.data import run

if __name__ == "__main__":
    run()
