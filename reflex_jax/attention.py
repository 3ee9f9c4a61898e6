"""The reflex attention op: one causal attention call over [own self K/V ++ borrowed K/V].

Head order is the contract (DESIGN §2): query head h < n_self reads this layer's own K/V head h;
the following heads read, group by group in schedule order, the source layer's last c self heads.
Concatenating K/V in that order turns the whole layer into one ordinary multi-head attention.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from .config import LayerPlan

KV = tuple[jax.Array, jax.Array]  # (k_BSKD, v_BSKD) of one layer's self heads


def gather_kv(own: KV, earlier: Sequence[KV], plan: LayerPlan) -> KV:
    """K/V for every query head of `plan`'s layer: own self heads, then each cross group."""
    ks, vs = [own[0]], [own[1]]
    for g in plan.cross:
        lo, hi = g.source_heads[0], g.source_heads[-1] + 1  # always a contiguous range
        ks.append(earlier[g.source][0][:, :, lo:hi])
        vs.append(earlier[g.source][1][:, :, lo:hi])
    if len(ks) == 1:
        return own
    return jnp.concatenate(ks, axis=2), jnp.concatenate(vs, axis=2)


def attention_mask(t_len: int, s_len: int, offset, key_mask_BS: Optional[jax.Array]):
    """Boolean [B|1, 1, T, S] mask: query t (at slot offset+t) sees key slots <= offset+t."""
    q_slot = jnp.arange(t_len)[:, None] + offset
    mask = (jnp.arange(s_len)[None, :] <= q_slot)[None, None]
    if key_mask_BS is not None:
        mask = mask & key_mask_BS[:, None, None, :].astype(bool)
    return mask


def causal_blocks(t_len: int) -> int:
    """Query blocks for plain causal attention on CPU: blocks of >= 128 queries (at most 4), so
    that the all-masked upper-right key blocks are skipped (a quarter of the work at 2 blocks);
    1 (one dense call) elsewhere. XLA:CPU computes dense attention over the full T x T."""
    if jax.default_backend() != "cpu" or t_len % 128:
        return 1
    return min(t_len // 128, 4)


def multihead_attention(q_BTHD, k_BSHD, v_BSHD, *, offset=0, key_mask_BS=None,
                        implementation: Optional[str] = None):
    """Causal attention of T queries (at slots offset..offset+T-1) over S key slots."""
    t_len, s_len = q_BTHD.shape[1], k_BSHD.shape[1]
    if key_mask_BS is None and t_len == s_len and isinstance(offset, int) and offset == 0:
        n = causal_blocks(t_len) if implementation is None else 1
        if n > 1:  # query block i attends to keys of blocks 0..i only
            c = t_len // n
            return jnp.concatenate(
                [multihead_attention(q_BTHD[:, i * c:(i + 1) * c], k_BSHD[:, :(i + 1) * c],
                                     v_BSHD[:, :(i + 1) * c], offset=i * c) if i else
                 jax.nn.dot_product_attention(q_BTHD[:, :c], k_BSHD[:, :c], v_BSHD[:, :c],
                                              is_causal=True)
                 for i in range(n)], axis=1)
        return jax.nn.dot_product_attention(q_BTHD, k_BSHD, v_BSHD, is_causal=True,
                                            implementation=implementation)
    mask = attention_mask(t_len, s_len, offset, key_mask_BS)
    return jax.nn.dot_product_attention(q_BTHD, k_BSHD, v_BSHD, mask=mask,
                                        implementation=implementation)
