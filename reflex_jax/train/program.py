"""The compiled side of a run: mesh, shardings, abstract state, the compiled train and eval steps,
state creation and batch placement. Built from the run config alone (no data, no run directory),
so a dry run, the fit search and the benchmark use the very program train.py trains with, also
for deviceless accelerator devices.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding
from ..errors import TrainingError
from ..kernels import DEFAULT, KernelChoices
from ..model import Decoder, abstract_params, param_logical_axes
from ..model.remat import remat_policy
from ..run_config import model_config_from
from . import checks, lora, step, validation
from .optim import make_optimizer
from .step import RNG_IMPLS, StepSettings, TrainState


class TrainProgram:
    """What a run compiles, from `config` (the run's ConfigDict).

    `devices`: the devices to build the mesh over (default: all, on every process; deviceless TPU
    or GPU devices for a dry run); `kernels`: which optimised kernels the model and loss use
    (bench.py's ablation), their platform defaulting to the mesh's; `token_bytes`: the UTF-8 bytes
    of each token id (validation.run_byte_lengths) for the eval step's bits per byte, all ones
    when only the shapes matter.
    """

    def __init__(self, config, *, devices=None, kernels: KernelChoices = DEFAULT,
                 token_bytes: Optional[np.ndarray] = None):
        checks.check_run_config(config)
        self.config = config
        self.model_config = model_config_from(config)
        self.seq_len = self.model_config.block_size
        self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                                       devices=devices)
        checks.check_fits_mesh(config, sharding.batch_shards(self.mesh))
        self.platform = self.mesh.devices.flat[0].platform
        # the step's kernels are the mesh's platform's, and the TPU kernel's shard_map needs the mesh
        self.kernels = dataclasses.replace(kernels, platform=kernels.platform or self.platform,
                                           mesh=kernels.mesh or self.mesh)
        self.remat = remat_policy(config.remat)
        self.model = Decoder(self.model_config, remat=self.remat, kernels=self.kernels)
        self.tx, self.lr_schedule = make_optimizer(config.optim, config.max_steps)
        # LoRA (train/lora.py): the state's params are the adapters; the frozen base is
        # `self.frozen`, placed once (set_frozen) and passed to every step, never donated
        self.lora = lora.spec_from_config(config)
        self.frozen, self._merge = None, None
        self.step_settings = StepSettings(self.model, config.data.loss_on, config.grad_accum,
                                          config.seed, config.get("rng_impl", RNG_IMPLS[0]),
                                          self.kernels, self.lora)
        self._build_shardings()
        self.train_step = self._compile_train_step()
        if token_bytes is None:
            token_bytes = validation.run_byte_lengths(None, self.model_config.vocab_size)
        self.eval_step = self._compile_eval_step(token_bytes)

    def _build_shardings(self):
        mesh = self.mesh
        params = abstract_params(self.model_config)
        # the model's params (the eval step's, sampling's, a LoRA run's frozen base)
        self.param_shardings = sharding.shardings_for(param_logical_axes(self.model_config),
                                                      params, mesh)
        self.abstract_model_params = _placed(params, self.param_shardings)
        trained, trained_shardings = params, self.param_shardings
        if self.lora is not None:  # the state trains (and saves) the adapters only
            trained = lora.abstract_adapters(self.model_config, self.lora)
            trained_shardings = sharding.shardings_for(
                lora.adapter_logical_axes(self.model_config, self.lora), trained, mesh)
        abstract_opt = jax.eval_shape(self.tx.init, trained)
        opt_shardings = sharding.like_params(abstract_opt, trained, trained_shardings, mesh)
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self.state_shardings = TrainState(step=self.replicated, params=trained_shardings,
                                          opt_state=opt_shardings)
        self.abstract_state = _placed(
            TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=trained,
                       opt_state=abstract_opt), self.state_shardings)
        self.batch_sharding = sharding.batch_sharding(mesh)

    def with_rules(self, fn):
        """`fn` traced under this mesh's logical-axis rules (for anything jitted on this mesh)."""
        rules = sharding.logical_rules_for_flax(self.mesh)

        @functools.wraps(fn)
        def wrapped(*args):
            with nn.logical_axis_rules(rules):
                return fn(*args)
        return wrapped

    @property
    def batch_keys(self) -> tuple:
        """The arrays of a training batch: tokens and mask, and with data.document_mask the
        segment ids and per-document positions (train/step.py)."""
        return ("tokens", "mask") + (step.DOCUMENT_KEYS if self.config.data.document_mask else ())

    @property
    def eval_batch_keys(self) -> tuple:
        return self.batch_keys + ("valid",)

    def abstract_batch(self, rows: int, keys: tuple, sharding=None) -> dict:
        """ShapeDtypeStructs of a batch of `rows` rows with `keys` (for lowering without data)."""
        shape = (rows, self.seq_len + 1)
        return {k: jax.ShapeDtypeStruct(shape, _batch_dtype(k), sharding=sharding or
                                        self.batch_sharding) for k in keys}

    def _compile_train_step(self):
        fn = functools.partial(step.train_step, self.step_settings, self.tx, self.lr_schedule)
        if self.lora is not None:
            jitted = jax.jit(self.with_rules(lambda state, frozen, batch: fn(state, batch, frozen)),
                             in_shardings=(self.state_shardings, self.param_shardings,
                                           self.batch_sharding),
                             out_shardings=(self.state_shardings, self.replicated),
                             donate_argnums=(0,))
            return _WithFrozen(jitted, self)
        # the batch sharding is a prefix of the batch dict: every array split by rows
        return jax.jit(self.with_rules(fn),
                       in_shardings=(self.state_shardings, self.batch_sharding),
                       out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,))

    def _compile_eval_step(self, token_bytes):
        # the sums of train/validation.py (loss, bytes, answer loss) in one pass; the byte table
        # is a constant of the compiled function
        fn = functools.partial(validation.eval_sums, self.step_settings, token_bytes)
        return jax.jit(self.with_rules(fn),
                       in_shardings=(self.param_shardings, self.batch_sharding),
                       out_shardings=self.replicated)

    def init_state(self, params=None) -> TrainState:
        """Fresh state created directly with its shardings (no full copy on one device). LoRA:
        `params` are the frozen base (placed as `self.frozen`, unless set already) and the state
        holds fresh adapters."""
        rng = jax.random.PRNGKey(self.config.seed)
        if self.lora is not None:
            if params is not None:
                self.set_frozen(params)
            if self.frozen is None:
                raise TrainingError("a LoRA run starts from its frozen base; pass the init_from "
                                    "params to init_state (or set_frozen) first.")
            cfg, spec, tx = self.model_config, self.lora, self.tx

            def fresh(rng):
                adapters = lora.init_adapters(cfg, spec, rng)
                return TrainState(step=jnp.zeros((), jnp.int32), params=adapters,
                                  opt_state=tx.init(adapters))
            return jax.jit(fresh, out_shardings=self.state_shardings)(rng)
        make = jax.jit(functools.partial(step.init_state, self.model, self.tx),
                       out_shardings=self.state_shardings)
        if params is None:
            return make(rng)
        return make(rng, jax.device_put(params, self.param_shardings))

    def set_frozen(self, params) -> None:
        """Place a LoRA run's frozen base on the mesh (once; every step reads it)."""
        self.frozen = jax.device_put(params, self.param_shardings)
        self._merge = None

    def model_params(self, params):
        """The model's params for the state's `params`: themselves, or (LoRA) the frozen base with
        the adapters merged (a new copy of the adapted kernels; for evaluation)."""
        if self.lora is None:
            return params
        if self._merge is None:
            spec = self.lora
            self._merge = jax.jit(lambda base, a: lora.merge(base, a, spec),
                                  out_shardings=self.param_shardings)
        return self._merge(self.frozen, params)

    def state_at(self, step_: int, params, opt_state) -> TrainState:
        """The state of a restored step (params and optimizer state already placed)."""
        return TrainState(step=jax.device_put(jnp.int32(step_), self.replicated), params=params,
                          opt_state=opt_state)

    def put_batch(self, local: dict, keys: Optional[tuple] = None,
                  global_rows: Optional[int] = None) -> dict:
        """The global batch (a dict of arrays, `keys`, default `batch_keys`) from this process's
        rows of it (see `sharding.process_rows`)."""
        out = {}
        rows = global_rows or self.config.batch_size
        _, blocks = sharding.process_rows(self.batch_sharding, rows)
        for k in keys or self.batch_keys:
            if k not in local:
                raise TrainingError(f"the batch has no {k!r} array (it has {', '.join(local)}); "
                                    "data.document_mask needs batches with segment_ids and "
                                    "positions (BatchLoader(documents=True)).")
            x = np.asarray(local[k], _batch_dtype(k))
            if x.shape[0] * blocks != rows:
                raise TrainingError(f"this process fed {x.shape[0]} rows but its block of a "
                                    f"{rows}-row batch has {rows // blocks}.")
            shape = (rows,) + x.shape[1:]
            out[k] = jax.make_array_from_process_local_data(self.batch_sharding, x, shape)
        return out

    def local_rows(self, batch: dict) -> dict:
        """This process's block of the rows of a global batch (every process holds all of it)."""
        n = batch["tokens"].shape[0]
        if n % sharding.batch_shards(self.mesh):
            raise TrainingError(f"validation batch of {n} rows does not split over mesh data*fsdp = "
                                f"{sharding.batch_shards(self.mesh)}; use a batch_size divisible by it.")
        block, blocks = sharding.process_rows(self.batch_sharding, n)
        k = n // blocks
        return {key: v[block * k:(block + 1) * k] for key, v in batch.items()}

    def dry_run(self, target=None, log=lambda s: None) -> tuple[str, dict]:
        """Compile the train and eval steps and sampling's prefill and decode step for this mesh
        (`target`: the reflex_jax.hardware.Target its devices came from, for the chip's figures);
        returns (the report for people, the same as a JSON-able dict)."""
        from .dry_run import format_report, report
        rep = report(self, target, log)
        return format_report(self, rep), rep


def _placed(tree, shardings):
    """ShapeDtypeStructs of `tree` carrying `shardings`."""
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


class _WithFrozen:
    """A LoRA run's compiled train step as `(state, batch) -> (state, metrics)`, like a full run's:
    the program's frozen base goes along as a separate, not donated argument (its abstract
    shapes when lowering)."""

    def __init__(self, jitted, program: TrainProgram):
        self.jitted, self.program = jitted, program

    def __call__(self, state, batch):
        return self.jitted(state, self.program.frozen, batch)

    def lower(self, state, batch):
        return self.jitted.lower(state, self.program.abstract_model_params, batch)


def _batch_dtype(key: str):
    """Token ids and document fields are int32; the mask and valid weights float32."""
    return np.int32 if key in ("tokens",) + step.DOCUMENT_KEYS else np.float32
