"""The reflex K/V contract: which K/V each query head of a layer reads (docs/attention.md).

Every layer computes K/V only for its n_self self heads and exports them; query head h < n_self
reads its own K/V head h, and the following heads read, cross group by cross group in schedule
order, the last c self heads of the group's source layer. Concatenating K/V in that order turns
a layer into one ordinary multi-head attention. The KV cache holds exactly the exported K/V.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from ..kernels import DEFAULT, KernelChoices
from ..kernels.attention import multihead_attention
from .schedule import CrossGroup, LayerPlan

KV = tuple[jax.Array, jax.Array]  # (k_BSKD, v_BSKD) of one layer's K self heads
Cache = tuple[KV, ...]            # per layer, [B, cache length, n_self, D]


def borrowed_kv(earlier: Sequence[KV], group: CrossGroup) -> KV:
    """The source layer's K/V heads that `group`'s cross heads read."""
    lo, hi = group.source_heads[0], group.source_heads[-1] + 1  # always a contiguous range
    k, v = earlier[group.source]
    return k[:, :, lo:hi], v[:, :, lo:hi]


def gather_kv(own: KV, earlier: Sequence[KV], plan: LayerPlan) -> KV:
    """K/V for every query head of `plan`'s layer: own self heads, then each cross group."""
    if not plan.cross:
        return own
    parts = [own] + [borrowed_kv(earlier, g) for g in plan.cross]
    return (jnp.concatenate([k for k, _ in parts], axis=2),
            jnp.concatenate([v for _, v in parts], axis=2))


def reflex_attention(q_BTHD, own: KV, earlier: Sequence[KV], plan: LayerPlan, *, offset=0,
                     key_mask_BS=None, dtype=None, implementation: Optional[str] = None,
                     kernels: KernelChoices = DEFAULT):
    """Attention of one layer: query head h reads own K/V head h (h < n_self), later heads read
    their cross group's source K/V (see `gather_kv`); K/V are cast to `dtype` (default q's).

    Prefill/training concatenate K/V into one [B, S, H, D] call (one big op, which the fused
    kernels of kernels/attention.py take: every layer then has H K/V heads). Cached decoding
    (one query) attends group by group over the caches in place instead: the concatenation would
    copy every layer's whole cache on every token, which made `all` decode slower than `none` at
    batch 8 (bench.py). Per head the math is the same in both forms.
    """
    dt = dtype or q_BTHD.dtype
    if q_BTHD.shape[1] != 1 or not plan.cross:
        k, v = gather_kv(own, earlier, plan)
        return multihead_attention(q_BTHD, k.astype(dt), v.astype(dt), offset=offset,
                                   key_mask_BS=key_mask_BS, implementation=implementation, kernels=kernels)
    groups = [(own, plan.n_self)] + [(borrowed_kv(earlier, g), g.n_heads) for g in plan.cross]
    outs, h = [], 0
    for (k, v), n in groups:
        outs.append(multihead_attention(q_BTHD[:, :, h:h + n], k.astype(dt), v.astype(dt),
                                        offset=offset, key_mask_BS=key_mask_BS,
                                        implementation=implementation, kernels=kernels))
        h += n
    return jnp.concatenate(outs, axis=2)


def init_cache(cfg, batch: int, length: int, dtype=None) -> Cache:
    """Zeroed per-layer cache holding only each layer's self heads: [B, length, n_self, D]."""
    dtype = dtype or cfg.compute_dtype
    return tuple((jnp.zeros((batch, length, p.n_self, cfg.head_dim), dtype),
                  jnp.zeros((batch, length, p.n_self, cfg.head_dim), dtype)) for p in cfg.layers)


def kv_cache_bytes(cfg, batch: int, length: int, dtype=None) -> int:
    """Bytes of `init_cache(cfg, batch, length, dtype)`: K and V of every self head."""
    itemsize = jnp.dtype(dtype or cfg.compute_dtype).itemsize
    return 2 * batch * length * cfg.kv_heads_total * cfg.head_dim * itemsize
