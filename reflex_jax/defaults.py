"""The base ml_collections config every `configs/*.py` file starts from.

Every field here can be overridden from the command line (`--config.model.n_layer=12`).
Optional fields use placeholders so that the command line can set them despite a None default.
"""
from __future__ import annotations

from ml_collections import ConfigDict, config_dict

from .config import ModelConfig


def model_config_dict(**overrides) -> ConfigDict:
    d = ModelConfig().to_dict()
    d.update(overrides)
    m = ConfigDict(d)
    for name, kind in (("mlp_hidden", int), ("reflex_window", int)):
        if m[name] is None:
            m[name] = config_dict.placeholder(kind)
    return m


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.model = model_config_dict()

    c.data = ConfigDict()
    c.data.dir = ""                # prepared token directory (python -m reflex_jax.data prepare)
    c.data.task = ""               # or a built-in task name (reflex_jax.tasks), generated, no files
    c.data.tokenizer = "bytes"     # for built-in tasks; prepared dirs name their own tokenizer
    c.data.loss_on = "all"         # all | answer (answer-only loss when the data has a mask)
    c.data.task_rows = 20000       # built-in tasks: rows generated for training
    c.data.task_val_rows = 256
    # every built-in task option with its default, so the command line can set any of them
    # (--config.data.task_options.n_pairs=4); a task receives only the options it has
    from .tasks import TASKS
    c.data.task_options = ConfigDict(TASKS["mix"].defaults)

    c.optim = ConfigDict()
    c.optim.lr = 1e-3
    c.optim.min_lr = 1e-5
    c.optim.warmup_steps = 400
    c.optim.b1 = 0.9
    c.optim.b2 = 0.98
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.decay_embeddings = False
    c.optim.clip = 1.0

    c.mesh = ConfigDict()
    c.mesh.data = -1               # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    c.run_dir = "runs/default"
    c.init_from = ""               # converted params dir or run dir to start from
    c.seed = 0
    c.max_steps = 1000
    c.batch_size = 8               # global sequences per optimizer step
    c.grad_accum = 1               # micro-batches per step (batch_size must divide by it)
    c.remat = False
    c.eval_interval = 200
    c.eval_batches = 8
    c.eval_exact_match = 64        # built-in tasks: rows scored by greedy generation at eval
    c.log_interval = 10
    c.checkpoint_interval = 500
    c.keep_checkpoints = 3
    c.async_checkpoints = True
    c.tensorboard = False
    c.wandb = False
    return c


def model_config_from(config: ConfigDict) -> ModelConfig:
    """The validated ModelConfig of an ml_collections config (errors name the field)."""
    return ModelConfig.from_dict(config.model.to_dict())


def reference_config(reflex: str = "all"):
    """The reference run of DESIGN §1 with the given schedule (configs/reflex.py, vanilla.py)."""
    c = base_config()
    m = c.model
    m.vocab_size, m.block_size = 50257, 2048
    m.n_layer, m.n_head, m.n_embd = 6, 8, 1536
    m.norm, m.mlp, m.bias, m.pos_emb = "rmsnorm", "swiglu", True, "learned"
    m.dropout = 0.1
    m.dtype = "bfloat16"
    m.reflex = reflex
    c.data.dir = "data/ru_instructions"
    name = "reflex" if reflex == "all" else "vanilla" if reflex == "none" else "custom"
    c.init_from = f"weights/rugpt3large_{name}"
    c.run_dir = f"runs/{name}"
    c.optim.lr, c.optim.min_lr, c.optim.warmup_steps = 1e-3, 1e-5, 400
    c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.clip = 0.9, 0.98, 0.1, 1.0
    c.batch_size, c.grad_accum = 16, 2   # 8 sequences x 2 accumulation steps
    c.max_steps = 10000
    return c
