"""The reference run (docs/training.md): 6x8 `all` schedule, n_embd 1536, block 2048, rugpt3large init,
fine-tuned on Den4ikAI/russian_instructions_2. Needs the prepared data and converted weights:

    python -m reflex_jax.data prepare --out data/ru_instructions
    python convert_weights.py --hf ai-forever/rugpt3large_based_on_gpt2 --config configs/reflex.py \
        --out weights/rugpt3large_reflex
    python train.py --config configs/reflex.py
"""
from reflex_jax.run_config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size, m.block_size = 50257, 2048
    m.n_layer, m.n_head, m.n_embd = 6, 8, 1536
    m.norm, m.mlp, m.bias, m.pos_emb = "rmsnorm", "swiglu", True, "learned"
    m.norm_eps = 1e-6  # the original code's RMSNorm eps
    m.dropout = 0.1
    m.dtype = "bfloat16"
    m.head_plan = "all"
    c.data.dir = "data/ru_instructions"
    c.init_from = "weights/rugpt3large_reflex"
    c.run_dir = "runs/reflex"
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 1e-3, 1e-5, 400
    c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.clip = 0.9, 0.98, 0.1, 1.0
    c.batch_size, c.grad_accum = 16, 2   # 8 sequences x 2 accumulation steps
    c.max_steps = 10000
    return c
