"""The reference run with vanilla attention (schedule `none`): the baseline for configs/reflex.py,
the same run in every other field.

    python convert_weights.py --hf ai-forever/rugpt3large_based_on_gpt2 --config configs/vanilla.py \
        --out weights/rugpt3large_vanilla
    python train.py --config configs/vanilla.py
"""
import os

from reflex_jax.run_config import load_config


def get_config():
    c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "reflex.py"))
    c.model.head_plan = "none"
    c.init_from = "weights/rugpt3large_vanilla"
    c.run_dir = "runs/vanilla"
    return c
