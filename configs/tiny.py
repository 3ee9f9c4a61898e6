"""The embedded default: a small Reflex decoder learns the built-in Russian arithmetic task
("Сколько будет 17 плюс 5?" -> "22") with a byte tokenizer and answers held-out questions.
No files, no network; minutes on a 2-core CPU (docs/training.md has the measured numbers).

    python train.py --config configs/tiny.py
"""
from reflex_jax.run_config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size, m.block_size = 259, 96       # byte tokenizer: 256 bytes + pad, bos, eos
    m.n_layer, m.n_head, m.n_embd = 4, 8, 128
    m.norm, m.mlp, m.pos_emb, m.bias = "rmsnorm", "swiglu", "learned", False
    m.dropout = 0.0
    m.head_plan = "all"
    c.data.task = "arith"
    c.data.task_options.ops = "plus"
    c.data.task_options.max_operand = 20       # 441 questions; 64 held out for exact match
    c.data.tokenizer = "bytes"
    c.data.loss_on = "answer"
    c.data.task_rows = 20000
    c.data.task_val_rows = 64
    c.run_dir = "runs/tiny"
    c.init_from = ""
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 3e-3, 1e-4, 50
    c.optim.b2 = 0.99
    c.batch_size, c.grad_accum = 32, 1
    c.max_steps = 600
    c.eval_interval = 200
    c.eval_batches = 4
    c.eval_exact_match = 64
    c.log_interval = 20
    c.checkpoint_interval = 200
    return c
