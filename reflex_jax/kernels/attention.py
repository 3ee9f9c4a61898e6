"""Causal multi-head attention: the one dispatch function every attention call goes through.

`multihead_attention` picks a kernel from the backend asked for (`implementation`, i.e.
model.attention) and the platform the step is compiled for (`KernelChoices.resolved_platform()`,
not the machine JAX runs on): cuDNN flash attention on GPUs, the Pallas splash kernel of
tpu_attention.py on TPUs, the CPU kernels of cpu_attention.py on CPUs, XLA's
dot_product_attention otherwise. The rules are in docs/attention.md#backends.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import jax
import jax.numpy as jnp

from ..errors import ConfigError
from . import DEFAULT, KernelChoices
from .cpu_attention import blockwise_causal_attention, causal_blocks, flash_query_block
from .tpu_attention import causal_flash_attention, context_mesh, splash_block

BACKENDS = ("auto", "xla", "cudnn", "flash")
_PLATFORM_OF = {"cudnn": ("gpu", "needs an NVIDIA GPU"),
                "flash": ("tpu", "is the Pallas TPU kernel and needs a TPU")}
_log = logging.getLogger(__name__)


def attention_mask(t_len: int, s_len: int, offset, key_mask_BS: Optional[jax.Array]):
    """Boolean [B|1, 1, T, S] mask: query t (at slot offset+t) sees key slots <= offset+t."""
    q_slot = jnp.arange(t_len)[:, None] + offset
    mask = (jnp.arange(s_len)[None, :] <= q_slot)[None, None]
    if key_mask_BS is not None:
        mask = mask & key_mask_BS[:, None, None, :].astype(bool)
    return mask


def same_document(q_segment_ids_BT, k_segment_ids_BS):
    """Boolean [B, 1, T, S]: query t and key s are in the same document."""
    return (q_segment_ids_BT[:, None, :, None] == k_segment_ids_BS[:, None, None, :])


def resolve_backend(implementation: Optional[str], platform: str) -> str:
    """'xla', 'cudnn' or 'flash' for model.attention=`implementation` (None: 'xla') on
    `platform`: 'auto' is cuDNN on 'gpu', the Pallas kernel on 'tpu', XLA elsewhere."""
    name = implementation or "xla"
    if name == "auto":
        return {"gpu": "cudnn", "tpu": "flash"}.get(platform, "xla")
    if name not in BACKENDS:
        raise ConfigError(f"model.attention={name!r} is unknown; use one of {' | '.join(BACKENDS)}.")
    needs, what = _PLATFORM_OF.get(name, (platform, ""))
    if platform != needs:
        raise ConfigError(f"model.attention={name!r} {what}, but the step is compiled for "
                          f"{platform}; use --config.model.attention=xla (or auto).")
    return name


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    _log.warning(message)


def _fused_causal(q_BTHD, k_BTHD, v_BTHD, segment_ids_BT, backend: str, kernels: KernelChoices,
                  strict: bool):
    """The platform's fused kernel for the plain causal call (with `segment_ids_BT`, also the
    document mask), or None where it cannot take the call: then an explicitly asked backend
    (`strict`) raises, and 'auto' logs why, once, and the caller uses XLA."""
    if backend == "flash":
        t_len = q_BTHD.shape[1]
        if t_len < 128:  # shorter than one kernel block (model init traces 8 tokens): XLA
            return None
        reason = None if splash_block(t_len) else f"sequence length {t_len} is not a multiple of 128"
        if reason is None:
            return causal_flash_attention(q_BTHD, k_BTHD, v_BTHD, segment_ids_BT,
                                          mesh=kernels.mesh, interpret=kernels.pallas_interpret)
    else:
        q_BTHD, k_BTHD, v_BTHD = _same_sharding(kernels.mesh, q_BTHD, k_BTHD, v_BTHD)
        # JAX's cuDNN call takes no segment ids; the document mask goes in as a dense mask,
        # which cuDNN applies as an additive bias inside its fused kernel
        mask = None if segment_ids_BT is None else same_document(segment_ids_BT, segment_ids_BT)
        try:
            return jax.nn.dot_product_attention(q_BTHD, k_BTHD, v_BTHD, mask=mask, is_causal=True,
                                                implementation="cudnn")
        # JAX's own checks of dtype, head size and lengths (NotImplementedError), and of the
        # mask's dtype (ValueError: it makes a bias only in bfloat16 or float16)
        except (NotImplementedError, ValueError) as e:
            reason = str(e).strip().rstrip(".")
            if mask is not None and isinstance(e, ValueError):
                reason = f"{reason} ({q_BTHD.dtype} with a document mask)"
    if strict:
        raise ConfigError(f"model.attention={backend!r} cannot take this attention call ({reason}); "
                          f"use --config.model.attention=auto to fall back to XLA for it.")
    _warn_once(f"attention: the {backend} kernel cannot take this call ({reason}); using XLA.")
    return None


def _same_sharding(mesh, *xs_BTHD):
    """cuDNN's partitioner takes q, k and v only with one sharding: batch over the batch mesh
    axes, heads over the head axes (each where it divides), as the TPU kernel's shard_map."""
    mesh = context_mesh(mesh)
    if mesh is None:
        return xs_BTHD
    from .. import sharding
    spec = sharding.spec_for(jax.sharding.PartitionSpec("batch", None, "heads", None),
                             xs_BTHD[0].shape, mesh)
    named = jax.sharding.NamedSharding(mesh, spec)
    return tuple(jax.lax.with_sharding_constraint(x, named) for x in xs_BTHD)


def _dense_attention(q_BTHD, k_BSHD, v_BSHD, offset, key_mask_BS, segment_ids=None):
    """XLA's attention with the causal mask (and the key and document masks); `segment_ids`:
    (of the queries [B, T], of the keys [B, S])."""
    t_len, s_len = q_BTHD.shape[1], k_BSHD.shape[1]
    plain = key_mask_BS is None and segment_ids is None
    if plain and t_len == s_len and isinstance(offset, int) and offset == 0:
        return jax.nn.dot_product_attention(q_BTHD, k_BSHD, v_BSHD, is_causal=True)
    mask = attention_mask(t_len, s_len, offset, key_mask_BS)
    if segment_ids is not None:
        mask = mask & same_document(*segment_ids)
    return jax.nn.dot_product_attention(q_BTHD, k_BSHD, v_BSHD, mask=mask)


def _cpu_attention(q_BTHD, k_BSHD, v_BSHD, offset: int, key_mask_BS, segment_ids_BT,
                   kernels: KernelChoices):
    """CPU: the blockwise kernel for plain causal calls, else query blocks that skip the fully
    masked keys (cpu_attention.py), each switch in `kernels`."""
    t_len, s_len = q_BTHD.shape[1], k_BSHD.shape[1]
    block = flash_query_block(t_len) if kernels.blockwise_backward else 0
    if block and offset == 0 and s_len == t_len and key_mask_BS is None:  # training, plain prefill
        return blockwise_causal_attention(q_BTHD, k_BSHD, v_BSHD, block, segment_ids_BT)
    n = causal_blocks(t_len) if kernels.attention_blocks else 1
    seg = None if segment_ids_BT is None else (segment_ids_BT, segment_ids_BT)
    if n == 1:
        return _dense_attention(q_BTHD, k_BSHD, v_BSHD, offset, key_mask_BS, seg)
    c = t_len // n  # query block i sees key slots < offset + (i + 1) * c only
    return jnp.concatenate(
        [_dense_attention(q_BTHD[:, i * c:(i + 1) * c], k_BSHD[:, :offset + (i + 1) * c],
                          v_BSHD[:, :offset + (i + 1) * c], offset + i * c,
                          None if key_mask_BS is None else key_mask_BS[:, :offset + (i + 1) * c],
                          None if seg is None else (seg[0][:, i * c:(i + 1) * c],
                                                    seg[1][:, :offset + (i + 1) * c]))
         for i in range(n)], axis=1)


def cached_query_attention(q_B1ND, k_BKSD, v_BKSD, mask):
    """One query per row (cached decoding) over a head-major cache: N query heads over K cache
    heads, each group of N/K consecutive query heads sharing one K/V head (GQA; N == K: one
    each). Each head's keys are one contiguous [S, D] block, so both products read the cache in
    place. `mask` [B|1, 1, 1, S]; scores, softmax and accumulation in float32."""
    f32 = jnp.float32
    B, _, N, D = q_B1ND.shape
    K = k_BKSD.shape[1]
    q_BKGD = q_B1ND.reshape(B, K, N // K, D)
    s_BKGS = jnp.einsum("bkgd,bksd->bkgs", q_BKGD, k_BKSD, preferred_element_type=f32) * D ** -0.5
    s_BKGS = jnp.where(mask[:, 0, 0][:, None, None, :], s_BKGS, jnp.finfo(f32).min)
    p_BKGS = jax.nn.softmax(s_BKGS, axis=-1).astype(q_B1ND.dtype)
    o_BKGD = jnp.einsum("bkgs,bksd->bkgd", p_BKGS, v_BKSD, preferred_element_type=f32)
    return o_BKGD.reshape(B, 1, N, D).astype(q_B1ND.dtype)


def multihead_attention(q_BTHD, k_BSHD, v_BSHD, *, offset=0, key_mask_BS=None,
                        segment_ids_BT=None, implementation: Optional[str] = None,
                        kernels: KernelChoices = DEFAULT):
    """Causal attention of T queries (at slots offset..offset+T-1) over S key slots.

    `implementation`: model.attention, one of BACKENDS (None: 'xla'). The fused kernels take the
    plain causal call of training and prefill (offset 0, T == S, no key mask), with or without
    `segment_ids_BT` (int [B, T], the document of each slot: a query sees only keys of its own
    document; training and scoring only, so offset 0 and T == S); masked calls (cached decoding,
    padded prompts) stay on XLA, with the CPU fast paths on 'cpu'."""
    platform = kernels.resolved_platform()
    backend = resolve_backend(implementation, platform)
    t_len, s_len = q_BTHD.shape[1], k_BSHD.shape[1]
    if segment_ids_BT is not None and not (isinstance(offset, int) and offset == 0
                                           and s_len == t_len):
        raise ValueError("segment_ids_BT is for T queries over the same T slots (no cache).")
    on_cpu = platform == "cpu"
    if not isinstance(offset, int):
        return _dense_attention(q_BTHD, k_BSHD, v_BSHD, offset, key_mask_BS)
    end = min(s_len, offset + t_len)  # slots after the last query are never visible
    k_BSHD, v_BSHD = k_BSHD[:, :end], v_BSHD[:, :end]
    key_mask_BS = None if key_mask_BS is None else key_mask_BS[:, :end]
    if backend != "xla" and offset == 0 and end == t_len and key_mask_BS is None:
        out = _fused_causal(q_BTHD, k_BSHD, v_BSHD, segment_ids_BT, backend, kernels,
                            strict=implementation != "auto")
        if out is not None:
            return out
    if on_cpu:
        return _cpu_attention(q_BTHD, k_BSHD, v_BSHD, offset, key_mask_BS, segment_ids_BT,
                              kernels)
    seg = None if segment_ids_BT is None else (segment_ids_BT, segment_ids_BT)
    return _dense_attention(q_BTHD, k_BSHD, v_BSHD, offset, key_mask_BS, seg)
