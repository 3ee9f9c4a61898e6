"""The dry run's report: the mesh, one compiled train step's memory, every parameter's sharding."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding


def _per_device_bytes(tree) -> int:
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
               for x in jax.tree_util.tree_leaves(tree))


def _mib(n) -> str:
    return f"{n / 2**20:,.1f} MiB"


def dry_run_report(trainer) -> str:
    """Compile one train step of `trainer` (abstract inputs: nothing is allocated) and describe it."""
    c, cfg, mesh = trainer.config, trainer.cfg, trainer.mesh
    B, T = c.batch_size, trainer.seq_len
    batch = jax.ShapeDtypeStruct((B, T + 1), jnp.int32, sharding=trainer.batch_sharding)
    mask = jax.ShapeDtypeStruct((B, T + 1), jnp.float32, sharding=trainer.batch_sharding)
    compiled = trainer.train_step.lower(trainer.abstract_state, batch, mask).compile()
    n_proc = jax.process_count()
    state = trainer.abstract_state
    lines = [f"mesh {dict(mesh.shape)} over {jax.device_count()} devices "
             f"({n_proc} process{'es' if n_proc > 1 else ''}); {cfg.schedule_table()}",
             f"batch {B} x {T + 1} split {sharding.format_spec(trainer.batch_sharding.spec, 2)} "
             f"({B // sharding.batch_shards(mesh)} rows per batch shard, "
             f"{B // c.grad_accum} per micro-batch x {c.grad_accum}); "
             f"remat {bool(c.remat)}; compute {cfg.dtype}, params {cfg.param_dtype}",
             f"per device: params {_mib(_per_device_bytes(state.params))}, "
             f"optimizer {_mib(_per_device_bytes(state.opt_state))}"]
    mem = compiled.memory_analysis()
    if mem is not None:
        lines.append(f"compiled step (per device): temporaries {_mib(mem.temp_size_in_bytes)} "
                     "(activations and workspace), "
                     f"arguments {_mib(mem.argument_size_in_bytes)}, "
                     f"outputs {_mib(mem.output_size_in_bytes)}")
    lines.append("parameter shardings:")
    for path, x in jax.tree_util.tree_leaves_with_path(state.params):
        lines.append(f"  {jax.tree_util.keystr(path):45s} {str(x.shape):18s} "
                     f"{sharding.format_spec(x.sharding.spec, len(x.shape))}")
    return "\n".join(lines)
