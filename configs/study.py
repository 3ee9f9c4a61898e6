"""The model and training of the KV-sharing study (docs/study.md): 6 layers x 8 heads, n_embd 128,
byte tokenizer (so bits per byte compare across tasks), 2,000 steps of about 1,600 tokens (>= 3 M
tokens per run). `scripts/kv_family_study.py` sets the task, block and batch per task and the head
plan per run; on its own it trains the literature task:

    python train.py --config configs/study.py --config.data.dir=data/lit_bytes_turgenev
"""
from reflex_jax.run_config import base_config


def get_config():
    c = base_config()
    m = c.model
    m.vocab_size, m.block_size = 259, 128      # byte tokenizer: 256 bytes + pad, bos, eos
    m.n_layer, m.n_head, m.n_embd = 6, 8, 128
    m.norm, m.mlp, m.pos_emb, m.bias = "rmsnorm", "swiglu", "learned", False
    m.dropout = 0.0
    m.dtype = "bfloat16"                       # parameters stay float32
    m.head_plan = "all"
    c.data.tokenizer = "bytes"
    c.data.loss_on = "all"
    c.data.task_rows = 50000                   # built-in tasks: fresh rows for all 2,000 steps
    c.data.task_val_rows = 256
    c.run_dir = "runs/study"
    c.init_from = ""
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 3e-3, 1e-4, 100
    c.optim.b2 = 0.99
    c.batch_size, c.grad_accum = 12, 1         # 12 x 128 = 1,536 tokens per step
    c.max_steps = 2000
    c.eval_interval = 250
    c.eval_batches = 32
    c.eval_exact_match = 0
    c.log_interval = 50
    c.checkpoint_interval = 500               # a stopped run loses at most 500 steps
    c.keep_checkpoints = 1
    return c
