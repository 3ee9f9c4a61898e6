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


def multihead_attention(q_BTHD, k_BSHD, v_BSHD, *, offset=0, key_mask_BS=None,
                        implementation: Optional[str] = None):
    """Causal attention of T queries (at slots offset..offset+T-1) over S key slots."""
    t_len, s_len = q_BTHD.shape[1], k_BSHD.shape[1]
    if key_mask_BS is None and t_len == s_len and isinstance(offset, int) and offset == 0:
        return jax.nn.dot_product_attention(q_BTHD, k_BSHD, v_BSHD, is_causal=True,
                                            implementation=implementation)
    mask = attention_mask(t_len, s_len, offset, key_mask_BS)
    return jax.nn.dot_product_attention(q_BTHD, k_BSHD, v_BSHD, mask=mask,
                                        implementation=implementation)
