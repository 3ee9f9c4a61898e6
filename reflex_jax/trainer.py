"""Training: sharded train state, the jit-compiled step, evaluation, the loop.

One step = one optimizer update over `batch_size` sequences, split into `grad_accum` micro-batches
that are scanned inside the compiled step. Params stay float32; the model computes in
`model.dtype`; the loss and its softmax are float32. The global batch at step s is a pure function
of (seed, s) and dropout keys are derived from (seed, step), so a resumed run repeats exactly what an
uninterrupted run would have done.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checkpoint as ckpt
from . import data as data_lib
from . import flops, sharding
from .defaults import model_config_from
from .losses import fused_cross_entropy_sum
from .model import Decoder, head_matrix, logits_from_hidden, param_logical_axes


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message is one sentence naming the fix."""


# Mistakes a user can make; CLIs print these as one line (ConfigError, CheckpointError, MeshError
# and the data module's errors are ValueErrors).
USER_ERRORS = (TrainingError, ValueError, FileNotFoundError)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def token_cross_entropy(hidden_BTE, head_VE, targets_BT):
    """Per-token cross-entropy in float32 from final hidden states."""
    logits = logits_from_hidden(hidden_BTE, head_VE)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
    return lse - picked


class Trainer:
    def __init__(self, config, *, log: Callable[[str], None] = print, devices=None):
        """`devices`: the devices to build the mesh over (default: all, on every process)."""
        self.config = config
        self.is_main = jax.process_index() == 0
        self.log = log if self.is_main else (lambda s: None)  # process 0 speaks for the job
        self.cfg = model_config_from(config)
        self._check_run_config()
        self.data, self.data_dir = self._open_data()
        self._check_fits_data()
        m = config.mesh
        self.mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
        self._check_fits_mesh()
        self.seq_len = self.cfg.block_size
        self.model = Decoder(self.cfg, remat=bool(config.remat))
        from .optim import make_optimizer
        self.tx, self.schedule = make_optimizer(config.optim, config.max_steps)
        self._build_shardings()
        # each process loads the rows its own devices hold (all of them if the batch axes stay
        # inside one host); the global batch is still a pure function of (seed, step)
        block, blocks = sharding.process_rows(self.batch_sharding, config.batch_size)
        self.train_loader = data_lib.BatchLoader(
            self.data, "train", config.batch_size, self.seq_len, config.seed,
            process_index=block, process_count=blocks)
        self._check_answer_tokens()
        if self.config.data.task and self.config.eval_exact_match > 0 and self.config.eval_interval:
            self._exact_match_prompts()
        self._val = None
        self.train_step = self._compile_train_step()
        self.eval_step = self._compile_eval_step()
        self._stop_signal: Optional[str] = None

    # ---- checks before anything compiles --------------------------------------------------
    def _check_run_config(self):
        c = self.config
        if c.batch_size < 1 or c.grad_accum < 1 or c.batch_size % c.grad_accum:
            raise TrainingError(f"batch_size={c.batch_size} must be a positive multiple of "
                                f"grad_accum={c.grad_accum}; each micro-batch has batch_size/grad_accum rows.")
        if c.max_steps < 1:
            raise TrainingError(f"max_steps={c.max_steps} must be >= 1.")
        if c.data.loss_on not in ("all", "answer"):
            raise TrainingError(f"data.loss_on={c.data.loss_on!r} must be 'all' or 'answer'.")
        for name in ("eval_interval", "checkpoint_interval", "log_interval"):
            if getattr(c, name) < 0:
                raise TrainingError(f"{name}={getattr(c, name)} must be >= 0 (0 turns it off).")

    def _open_data(self):
        c = self.config
        if c.data.dir:
            if not os.path.isdir(c.data.dir):
                raise TrainingError(
                    f"data directory {c.data.dir!r} does not exist; prepare it with "
                    f"`python -m reflex_jax.data prepare --out {c.data.dir} ...` or set --config.data.dir.")
            return data_lib.TokenData.open(c.data.dir), c.data.dir
        if c.data.task:
            out = os.path.join(c.run_dir, "data")
            if self_is_main():
                data_lib.prepare_task(c.data.task, out, tokenizer=c.data.tokenizer,
                                      n_train=c.data.task_rows, n_val=c.data.task_val_rows,
                                      seed=c.seed, **_task_options(c.data))
            _sync("prepared task data")
            return data_lib.TokenData.open(out), out
        raise TrainingError("no training data: set --config.data.dir to a prepared directory or "
                            "--config.data.task to a built-in task.")

    def _check_fits_data(self):
        meta, cfg = self.data.meta, self.cfg
        if meta["vocab_size"] > cfg.vocab_size:
            raise TrainingError(
                f"the data in {self.data_dir!r} uses a {meta['vocab_size']}-token vocabulary but "
                f"model.vocab_size={cfg.vocab_size}; set --config.model.vocab_size={meta['vocab_size']} "
                "(or larger).")
        for split in ("train", "val"):
            tokens = meta["splits"].get(split, {}).get("tokens", 0)
            if split == "train" and tokens < cfg.block_size + 1:
                raise TrainingError(
                    f"the {split} split of {self.data_dir!r} has {tokens} tokens, fewer than one "
                    f"window of block_size+1={cfg.block_size + 1}; lower --config.model.block_size "
                    "or prepare more data.")

    def _check_fits_mesh(self):
        c, shards = self.config, sharding.batch_shards(self.mesh)
        micro = c.batch_size // c.grad_accum
        if micro % shards:
            raise TrainingError(
                f"batch_size/grad_accum = {micro} rows per micro-batch must be divisible by "
                f"config.mesh data*fsdp = {shards} (every batch shard takes an equal slice); change "
                "--config.batch_size or the mesh.")

    def _check_answer_tokens(self):
        if self.config.data.loss_on != "answer":
            return
        # the whole global batch, so that every process reaches the same verdict
        first = data_lib.BatchLoader(self.data, "train", self.config.batch_size, self.seq_len,
                                     self.config.seed).batch(0)
        if not np.asarray(first["mask"])[:, 1:].any():
            raise TrainingError(
                f"data.loss_on='answer' but the first batch of {self.data_dir!r} holds no answer "
                f"tokens within block_size={self.cfg.block_size}; raise --config.model.block_size "
                "above the row length or set --config.data.loss_on=all.")

    # ---- shardings and compiled functions ---------------------------------------------------
    def _build_shardings(self):
        cfg, mesh = self.cfg, self.mesh
        self.abstract_params = jax.eval_shape(
            lambda: nn.meta.unbox(self.model.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 8), jnp.int32))["params"]))
        self.param_shardings = sharding.shardings_for(param_logical_axes(cfg), self.abstract_params,
                                                      mesh)
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
        self.opt_shardings = sharding.like_params(abstract_opt, self.abstract_params,
                                                  self.param_shardings, mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.state_shardings = TrainState(step=replicated, params=self.param_shardings,
                                          opt_state=self.opt_shardings)
        self.abstract_state = jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=self.abstract_params,
                       opt_state=abstract_opt), self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.replicated = replicated

    def init_state(self, params=None) -> TrainState:
        """Fresh state created directly with its shardings (no full copy on one device)."""
        rng = jax.random.PRNGKey(self.config.seed)
        model, tx = self.model, self.tx

        def make(rng, params):
            if params is None:
                params = nn.meta.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"])
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

        if params is None:
            return jax.jit(lambda r: make(r, None), out_shardings=self.state_shardings)(rng)
        params = jax.device_put(params, self.param_shardings)
        return jax.jit(make, out_shardings=self.state_shardings)(rng, params)

    def _weights(self, tokens, mask, valid=None):
        w = mask[:, 1:] if self.config.data.loss_on == "answer" else jnp.ones_like(mask[:, 1:])
        return w if valid is None else w * valid[:, 1:]

    def _loss_sum(self, params, tokens, weights, rng, deterministic):
        hidden = self.model.apply({"params": params}, tokens[:, :-1], deterministic=deterministic,
                                  rngs=None if deterministic else {"dropout": rng},
                                  return_hidden=True)
        # == sum(token_cross_entropy(...) * weights), without [B*T, vocab] float32 logits
        return fused_cross_entropy_sum(hidden, head_matrix(self.cfg, params), tokens[:, 1:], weights)

    def _compile_train_step(self):
        A, B = self.config.grad_accum, self.config.batch_size
        seed, deterministic = self.config.seed, self.cfg.dropout == 0.0
        tx, schedule = self.tx, self.schedule
        rules = sharding.logical_rules_for_flax(self.mesh)

        def step_fn(state: TrainState, tokens, mask):
            weights = self._weights(tokens, mask).astype(jnp.float32)
            total = jnp.maximum(jnp.sum(weights), 1.0)
            rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
            grad_fn = jax.value_and_grad(self._loss_sum)
            if A == 1:
                loss_sum, grads = grad_fn(state.params, tokens, weights, rng, deterministic)
            else:
                # micro-batch a = rows a, a+A, ...: every data shard holds rows of every micro-batch
                split = lambda x: x.reshape(B // A, A, *x.shape[1:]).swapaxes(0, 1)  # noqa: E731

                def body(carry, xs):
                    g_acc, l_acc = carry
                    i, tok, w = xs
                    l, g = grad_fn(state.params, tok, w, jax.random.fold_in(rng, i), deterministic)
                    return (jax.tree_util.tree_map(jnp.add, g_acc, g), l_acc + l), None

                zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
                (grads, loss_sum), _ = jax.lax.scan(
                    body, (zeros, jnp.zeros((), jnp.float32)),
                    (jnp.arange(A), split(tokens), split(weights)))
            grads = jax.tree_util.tree_map(lambda g: g / total, grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            metrics = {"loss": loss_sum / total, "grad_norm": optax.global_norm(grads),
                       "lr": schedule(state.step)}
            return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

        def wrapped(state, tokens, mask):
            with nn.logical_axis_rules(rules):
                return step_fn(state, tokens, mask)

        return jax.jit(wrapped, in_shardings=(self.state_shardings, self.batch_sharding,
                                              self.batch_sharding),
                       out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))

    def _compile_eval_step(self):
        rules = sharding.logical_rules_for_flax(self.mesh)

        def eval_fn(params, tokens, mask, valid):
            with nn.logical_axis_rules(rules):
                w = self._weights(tokens, mask, valid).astype(jnp.float32)
                return self._loss_sum(params, tokens, w, None, True), jnp.sum(w)

        return jax.jit(eval_fn, in_shardings=(self.param_shardings,) + (self.batch_sharding,) * 3,
                       out_shardings=(self.replicated, self.replicated))

    def put_batch(self, local: dict, keys=("tokens", "mask"), global_rows: Optional[int] = None):
        """Global arrays from this process's rows of the batch (see `sharding.process_rows`)."""
        arrays = []
        rows = global_rows or self.config.batch_size
        _, blocks = sharding.process_rows(self.batch_sharding, rows)
        for k in keys:
            x = np.asarray(local[k], np.int32 if k == "tokens" else np.float32)
            if x.shape[0] * blocks != rows:
                raise TrainingError(f"this process fed {x.shape[0]} rows but its block of a "
                                    f"{rows}-row batch has {rows // blocks}.")
            shape = (rows,) + x.shape[1:]
            arrays.append(jax.make_array_from_process_local_data(self.batch_sharding, x, shape))
        return arrays

    def dry_run(self) -> str:
        """Compile one train step and report per-device memory and every parameter's sharding."""
        B, T = self.config.batch_size, self.seq_len
        batch = jax.ShapeDtypeStruct((B, T + 1), jnp.int32, sharding=self.batch_sharding)
        mask = jax.ShapeDtypeStruct((B, T + 1), jnp.float32, sharding=self.batch_sharding)
        compiled = self.train_step.lower(self.abstract_state, batch, mask).compile()

        def per_device(tree) -> int:
            return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
                       for x in jax.tree_util.tree_leaves(tree))

        mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
        n_proc = jax.process_count()
        lines = [f"mesh {dict(self.mesh.shape)} over {jax.device_count()} devices "
                 f"({n_proc} process{'es' if n_proc > 1 else ''}); {self.cfg.schedule_table()}",
                 f"batch {B} x {T + 1} split {sharding.format_spec(self.batch_sharding.spec, 2)} "
                 f"({B // sharding.batch_shards(self.mesh)} rows per batch shard, "
                 f"{B // self.config.grad_accum} per micro-batch x {self.config.grad_accum}); "
                 f"remat {bool(self.config.remat)}; compute {self.cfg.dtype}, params {self.cfg.param_dtype}",
                 f"per device: params {mib(per_device(self.abstract_state.params))}, "
                 f"optimizer {mib(per_device(self.abstract_state.opt_state))}"]
        mem = compiled.memory_analysis()
        if mem is not None:
            lines.append(f"compiled step (per device): temporaries {mib(mem.temp_size_in_bytes)} "
                         "(activations and workspace), "
                         f"arguments {mib(mem.argument_size_in_bytes)}, outputs {mib(mem.output_size_in_bytes)}")
        lines.append("parameter shardings:")
        for path, x in jax.tree_util.tree_leaves_with_path(self.abstract_state.params):
            lines.append(f"  {jax.tree_util.keystr(path):45s} {str(x.shape):18s} "
                         f"{sharding.format_spec(x.sharding.spec, len(x.shape))}")
        return "\n".join(lines)

    # ---- evaluation --------------------------------------------------------------------------
    def val_batches(self):
        if self._val is None:
            self._val = data_lib.val_batches(self.data, self.config.batch_size // self.config.grad_accum
                                             if self.config.grad_accum > 1 else self.config.batch_size,
                                             self.seq_len, self.config.eval_batches)
        return self._val

    def evaluate(self, params) -> dict:
        loss_sum, count = 0.0, 0.0
        for b in self.val_batches():
            lo = self._local_rows(b)
            tokens, mask, valid = self.put_batch(lo, ("tokens", "mask", "valid"),
                                                 global_rows=b["tokens"].shape[0])
            ls, n = self.eval_step(params, tokens, mask, valid)
            loss_sum, count = loss_sum + float(ls), count + float(n)
        val_loss = loss_sum / max(count, 1.0)
        out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}
        if self.config.data.task and self.config.eval_exact_match > 0:
            out.update(self.exact_match(params))
        return out

    def _local_rows(self, batch: dict) -> dict:
        n = batch["tokens"].shape[0]
        if n % sharding.batch_shards(self.mesh):
            raise TrainingError(f"validation batch of {n} rows does not split over mesh data*fsdp = "
                                f"{sharding.batch_shards(self.mesh)}; use a batch_size divisible by it.")
        block, blocks = sharding.process_rows(self.batch_sharding, n)
        k = n // blocks
        return {key: v[block * k:(block + 1) * k] for key, v in batch.items()}

    def _exact_match_prompts(self):
        """(rows, prompt token lists, answer budget) for the held-out task questions, checked to fit."""
        from . import tasks
        from .tokenizer import load_tokenizer
        rows = data_lib.task_val_rows(self.data.meta)[: self.config.eval_exact_match]
        tok = load_tokenizer(self.data.meta["tokenizer"])
        template = self.data.meta.get("template", data_lib.DEFAULT_TEMPLATE)
        prompts = [[tok.bos_id] + tok.encode(tasks.render_prompt(r["question"], template)) for r in rows]
        budget = max(len(tok.encode(r["answer"])) for r in rows) + 2
        longest = max(len(p) for p in prompts) + budget
        if longest > self.cfg.block_size:
            raise TrainingError(
                f"eval_exact_match needs prompt + answer = {longest} tokens but "
                f"model.block_size={self.cfg.block_size}; raise the block size or set "
                "--config.eval_exact_match=0.")
        return rows, prompts, budget, tok

    def exact_match(self, params) -> dict:
        """Greedy answers to held-out task questions, scored by the task's exact-match rule."""
        from . import sampling, tasks
        rows, prompts, budget, tok = self._exact_match_prompts()
        task = tasks.get_task(self.config.data.task)
        # multi-host params have shards on other hosts; every process gathers a full copy and
        # scores the same rows (only process 0 logs the result)
        host_params = sharding.gather_to_host(params, self.mesh) if jax.process_count() > 1 else params
        if not hasattr(self, "_generator"):
            self._generator = sampling.Generator(self.cfg)
        outs = self._generator.generate(host_params, prompts, max_new_tokens=budget,
                                        eos_id=tok.eos_id, pad_id=tok.pad_id)
        hits = [task.score(tok.decode(o), r["answer"]) for o, r in zip(outs, rows)]
        return {"exact_match": float(np.mean(hits))}

    # ---- run directory -------------------------------------------------------------------------
    def _write_run_files(self):
        c = self.config
        os.makedirs(c.run_dir, exist_ok=True)
        model_path = os.path.join(c.run_dir, ckpt.MODEL_CONFIG)
        if os.path.exists(model_path):
            diff = self.cfg.model_differences(ckpt.read_model_config(c.run_dir))
            if diff and os.path.isdir(os.path.join(c.run_dir, ckpt.CHECKPOINTS)):
                raise TrainingError(
                    f"run_dir {c.run_dir!r} holds checkpoints of a different model (model.{diff[0]} "
                    f"differs); use a new --config.run_dir or the same model config to resume.")
        # every process checks (same files, same verdict); only process 0 writes, since two
        # writers racing on the same temp file would break the atomic replace
        if self.is_main:
            ckpt.write_json(model_path, self.cfg.to_dict())
            ckpt.write_json(os.path.join(c.run_dir, "config.json"), c.to_dict())
            ckpt.write_json(os.path.join(c.run_dir, ckpt.META),
                            {"tokenizer": self.data.meta["tokenizer"],
                             "data_dir": os.path.abspath(self.data_dir),
                             "template": self.data.meta.get("template"), "task": c.data.task or None})
        _sync("run files written")

    def _restore_or_init(self, checkpoints: ckpt.RunCheckpoints):
        c = self.config
        latest = checkpoints.latest_step()
        if latest is not None:
            params, opt = checkpoints.restore(latest, self.abstract_state.params,
                                              self.abstract_state.opt_state)
            state = TrainState(step=jax.device_put(jnp.int32(latest), self.replicated), params=params,
                               opt_state=opt)
            self.log(f"resuming {c.run_dir} from step {latest}")
            return state
        if c.init_from:
            params = self._init_params(c.init_from)
            self.log(f"initialised params from {c.init_from}")
            return self.init_state(params)
        return self.init_state()

    def _init_params(self, path: str):
        """`init_from` params (a params dir or a run dir's best step), checked against the model."""
        if jax.process_count() == 1:
            _, params = ckpt.load_params(path)
            ckpt.check_params_fit(self.cfg, params, path)
            return params
        # multi-host: orbax cannot restore a tree saved on another topology without a target, and
        # no host needs the whole model: every process restores only its shards of this mesh
        import orbax.checkpoint as ocp
        path = os.path.abspath(os.path.expanduser(path))
        ckpt.read_model_config(path)  # one sentence if this is not a params or run directory
        target = self.abstract_state.params

        def check(item: str, where: str):  # shapes from the metadata, before reading any weights
            meta = ocp.StandardCheckpointer().metadata(item).item_metadata
            ckpt.check_params_fit(self.cfg, getattr(meta, "tree", meta), where)

        if os.path.isdir(os.path.join(path, ckpt.PARAMS)):
            check(os.path.join(path, ckpt.PARAMS), path)
            return ckpt.restore_tree(os.path.join(path, ckpt.PARAMS), target)
        run = ckpt.RunCheckpoints(path, create=False)
        try:
            step = run.pick_step()
            check(os.path.join(run.directory, str(step), "params"), f"{path} step {step}")
            return run.restore_params(step, target)
        finally:
            run.close()

    # ---- the loop ----------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._stop_signal = signal.Signals(signum).name

    def train(self) -> dict:
        c = self.config
        self._write_run_files()
        checkpoints = ckpt.RunCheckpoints(c.run_dir, keep=c.keep_checkpoints,
                                          async_save=bool(c.async_checkpoints))
        state = self._restore_or_init(checkpoints)
        start = int(state.step)
        metrics_log = MetricsLog(os.path.join(c.run_dir, "metrics.jsonl"), start, self.is_main,
                                 tensorboard=c.tensorboard, wandb=c.wandb, config=c.to_dict())
        tokens_per_step = c.batch_size * self.seq_len
        flops_per_token = flops.train_flops_per_token(self.cfg, self.seq_len)
        peak, _ = flops.device_peak(self.cfg.compute_dtype)
        peak *= jax.device_count()
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        bar = _progress(c.max_steps, start, self.is_main)
        pending: list[tuple[int, Any]] = []  # (step, metrics on device) not yet checked/logged
        last_good = checkpoints.latest_step()
        summary: dict = {"run_dir": os.path.abspath(c.run_dir), "start_step": start}
        t_last, steps_since = time.perf_counter(), 0
        step = start

        def flush() -> dict:
            """Fetch pending metrics; stop the run on a non-finite loss."""
            nonlocal pending
            fetched = [(s, jax.device_get(m)) for s, m in pending]
            pending = []
            for s, m in fetched:
                if not np.isfinite(m["loss"]):
                    where = (f"the last good checkpoint is step {last_good} in {checkpoints.directory}"
                             if last_good is not None else "no checkpoint was written")
                    raise TrainingError(
                        f"loss became {m['loss']} at step {s}; stopping without saving ({where}); "
                        "lower --config.optim.lr or check the data.")
            return fetched[-1][1] if fetched else {}

        def save(step, val_loss=None):
            nonlocal last_good
            flush()
            checkpoints.save(step, state.params, state.opt_state, val_loss)
            last_good = step

        try:
            while step < c.max_steps and self._stop_signal is None:
                tokens, mask = self.put_batch(self._local_rows_train(step))
                state, m = self.train_step(state, tokens, mask)
                step += 1
                steps_since += 1
                pending.append((step, m))
                bar.update(1)
                val = None
                if c.eval_interval and (step % c.eval_interval == 0 or step == c.max_steps):
                    val = self.evaluate(state.params)
                log_now = ((c.log_interval and step % c.log_interval == 0) or val is not None
                           or step == c.max_steps or self._stop_signal is not None)
                if log_now:
                    last = flush()
                    now = time.perf_counter()
                    tok_s = steps_since * tokens_per_step / max(now - t_last, 1e-9)
                    t_last, steps_since = now, 0
                    row = {"step": step, "loss": float(last["loss"]), "lr": float(last["lr"]),
                           "grad_norm": float(last["grad_norm"]), "tokens": step * tokens_per_step,
                           "tokens_per_s": tok_s, "mfu": tok_s * flops_per_token / peak}
                    if val:
                        row.update(val)
                    metrics_log.write(row)
                    bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in row.items()
                                     if k in ("loss", "lr", "tokens_per_s", "mfu", "val_loss", "exact_match")})
                    summary.update(row)
                if val or (c.checkpoint_interval and step % c.checkpoint_interval == 0):
                    save(step, val["val_loss"] if val else None)
            if step != last_good:  # final (or signal-stop) save, unless this step is saved already
                save(step, summary.get("val_loss") if summary.get("step") == step else None)
        finally:
            bar.close()
            checkpoints.close()
            metrics_log.close()
            for s, h in old_handlers.items():
                signal.signal(s, h)
        summary.update({"final_step": step, "checkpoint_dir": checkpoints.directory,
                        "stopped_by": self._stop_signal})
        self.state = state
        return summary

    def _local_rows_train(self, step: int) -> dict:
        return self.train_loader.batch(step)


def _task_options(data_cfg) -> dict:
    """The config's task options that the chosen task has (the config lists every task's options)."""
    from .tasks import get_task
    known = get_task(data_cfg.task).defaults
    return {k: v for k, v in dict(data_cfg.task_options).items() if k in known}


def self_is_main() -> bool:
    return jax.process_index() == 0


def _sync(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True,
                desc="train", unit="step")


class MetricsLog:
    """metrics.jsonl (one JSON object per log line) plus optional TensorBoard / W&B mirrors.

    On resume, lines from steps after the restored step are dropped: they belong to the run that
    was interrupted, and the resumed run writes them again.
    """

    def __init__(self, path: str, start_step: int, enabled: bool, *, tensorboard=False, wandb=False,
                 config=None):
        self.enabled, self.path = enabled, path
        self.tb = self.wb = None
        if not enabled:
            return
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= start_step]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(keep)
        self.file = open(path, "a", encoding="utf-8")
        run_dir = os.path.dirname(path)
        if tensorboard:
            try:
                from flax.metrics import tensorboard as tb
                self.tb = tb.SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:
                print("tensorboard was asked for but is not installed (pip install tensorboard); "
                      "logging to metrics.jsonl only.")
        if wandb:
            try:
                import wandb as wb
                self.wb = wb.init(project="reflex_jax", dir=run_dir, config=config, resume="allow")
            except ImportError:
                print("wandb was asked for but is not installed (pip install wandb); "
                      "logging to metrics.jsonl only.")

    def write(self, row: dict):
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in row.items():
            if k != "step" and self.tb is not None:
                self.tb.scalar(k, v, row["step"])
        if self.wb is not None:
            self.wb.log(row, step=row["step"])

    def close(self):
        if self.enabled:
            self.file.close()
            if self.tb is not None:
                self.tb.flush()
