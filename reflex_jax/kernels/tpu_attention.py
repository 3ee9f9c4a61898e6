"""TPU causal attention: the Pallas splash-attention kernel (a block-sparse flash attention), run
under shard_map.

XLA cannot partition a Mosaic kernel, so on a mesh the kernel runs inside `jax.shard_map`: batch
over the mesh axes of the logical 'batch' axis and heads over those of 'heads' (sharding.RULES),
each replicated where its mesh axes do not divide it. Splash takes any head size, so the 192-wide
heads of the reference config are not padded (docs/attention.md#backends has the measured cost).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from .. import sharding
from ..errors import MeshError

_BLOCKS = (512, 256, 128)  # splash's blocks are multiples of the 128 TPU lanes


def splash_block(t_len: int) -> int:
    """Query and key block of the kernel for T queries over T keys: the largest of 512, 256, 128
    that divides T; 0 when none does (the call stays on XLA)."""
    return next((b for b in _BLOCKS if t_len % b == 0), 0)


def context_mesh(mesh=None):
    """`mesh`, else the mesh of an enclosing `jax.set_mesh`, else None (one device)."""
    if mesh:
        return mesh
    abstract = jax.sharding.get_abstract_mesh()
    return None if abstract.empty else abstract


def _splash_kernel(n_heads: int, t_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    block = splash_block(t_len)
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    mask = sm.MultiHeadMask([sm.CausalMask((t_len, t_len))] * n_heads)
    return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _local_attention(q_BTHD, k_BTHD, v_BTHD, segment_ids_BT=None, *, interpret: bool):
    """The kernel on one shard's rows and heads; splash does not scale the scores, so q is
    multiplied by 1/sqrt(D) first. With `segment_ids_BT`, splash's own document masking (its
    SegmentIds; blocks are still skipped by the causal mask only)."""
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds
    _, t_len, n_heads, d = q_BTHD.shape
    kernel = _splash_kernel(n_heads, t_len, interpret)
    to_BHTD = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    args = (to_BHTD(q_BTHD * d ** -0.5), to_BHTD(k_BTHD), to_BHTD(v_BTHD))
    if segment_ids_BT is None:
        o_BHTD = jax.vmap(kernel)(*args)  # over the batch rows
    else:
        seg = segment_ids_BT.astype(jnp.int32)
        o_BHTD = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=SegmentIds(s, s)))(
            *args, seg)
    return to_BHTD(o_BHTD)


def causal_flash_attention(q_BTHD, k_BTHD, v_BTHD, segment_ids_BT=None, *, mesh=None,
                           interpret: bool = False):
    """Causal self-attention of T queries over the same T slots (T a multiple of 128, see
    `splash_block`), every query head with its own K/V head, a query seeing only the keys of its
    own document where `segment_ids_BT` (int [B, T]) is given; under shard_map over `mesh` (see
    `context_mesh`) when there is one."""
    local = functools.partial(_local_attention, interpret=interpret)
    mesh = context_mesh(mesh)
    if mesh is None:
        return local(q_BTHD, k_BTHD, v_BTHD, segment_ids_BT)
    missing = [a for a in sharding.MESH_AXES if a not in mesh.axis_names]
    if missing:
        raise MeshError(f"the Pallas TPU attention shards over the mesh axes "
                        f"{', '.join(sharding.MESH_AXES)}, but the mesh lacks {', '.join(missing)}; "
                        f"build it with reflex_jax.sharding.make_mesh.")
    spec = sharding.spec_for(P("batch", None, "heads", None), q_BTHD.shape, mesh)
    # check_vma=False: the Pallas call declares no per-axis variance; values and gradients with
    # replicated batch or heads are tested against XLA (tests/test_tpu_attention.py)
    if segment_ids_BT is None:
        return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec,
                             check_vma=False)(q_BTHD, k_BTHD, v_BTHD)
    seg_spec = P(spec[0], None)  # the rows as q's, the slots whole
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3 + (seg_spec,), out_specs=spec,
                         check_vma=False)(q_BTHD, k_BTHD, v_BTHD, segment_ids_BT)

