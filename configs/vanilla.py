"""The reference run with vanilla attention (schedule `none`): the baseline for configs/reflex.py."""
from reflex_jax.run_config import reference_config


def get_config():
    return reference_config("none")
