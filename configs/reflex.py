"""The reference run (docs/training.md): 6x8 `all` schedule, n_embd 1536, block 2048, rugpt3large init,
fine-tuned on Den4ikAI/russian_instructions_2. Needs the prepared data and converted weights:

    python -m reflex_jax.data prepare --out data/ru_instructions
    python convert_weights.py --hf ai-forever/rugpt3large_based_on_gpt2 --config configs/reflex.py \
        --out weights/rugpt3large_reflex
    python train.py --config configs/reflex.py
"""
from reflex_jax.run_config import reference_config


def get_config():
    return reference_config("all")
