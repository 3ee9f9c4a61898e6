"""The reflex K/V contract: which K/V each query head of a layer reads (docs/attention.md).

Every layer computes K/V only for its own K/V heads (n_kv; one per self head unless GQA groups
them) and exports them; self head h reads own K/V head `plan.self_kv_heads[h]`, and the following
heads read, cross group by cross group in schedule order, the last c K/V heads of the group's
source layer (a `share="v"` group: its own K and the source's V; a routed group: a learned mixture
of the sources' K/V). Giving every query head its K/V in that order turns a layer into one
ordinary multi-head attention. The KV cache holds exactly what the layers compute: n_k K heads
(the exported ones, then the share-V heads' own K) and n_v V heads per layer.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ..kernels import DEFAULT, KernelChoices
from ..kernels.attention import attention_mask, cached_query_attention, multihead_attention
from .schedule import CrossGroup, LayerPlan

KV = tuple[jax.Array, jax.Array]  # (k_BSKD, v_BSKD) of one layer: its n_k K and n_v V heads
Cache = tuple[KV, ...]            # per layer, head-major: [B, n_k | n_v, cache length, D]


# K/V arrays are [B, S, K, D] (HEAD_AXIS 2) in training and prefill, and [B, K, S, D] in a cache
# (CACHE_HEAD_AXIS 1): a single query then reads each head's keys as one contiguous [S, D] block,
# where [B, S, K, D] made every decode step copy the whole cache into that order (bench.py).
HEAD_AXIS, CACHE_HEAD_AXIS = 2, 1


@flax.struct.dataclass
class HeadRanges:
    """One layer's K or V held as consecutive head ranges, split once where the later layers'
    groups begin and end: piece i holds heads starts[i] .. starts[i + 1] - 1.

    A group reading a slice of the whole array makes the backward pad that slice's gradient back
    to the array's full size and add it to the other readers' (XLA:CPU: a full-size loop per
    reader; docs/bench.md has what it cost). Read from pieces, each reader's gradient lands on
    its own pieces and the array's gradient is one concatenation of them."""
    pieces: tuple
    starts: tuple[int, ...] = flax.struct.field(pytree_node=False)


Heads = Union[jax.Array, HeadRanges]


def split_heads(x, starts: Sequence[int], axis: int = HEAD_AXIS) -> Heads:
    """`x` as HeadRanges beginning at `starts` (0 first); x itself where that is one range."""
    starts = tuple(sorted({s for s in starts if s < x.shape[axis]}))
    if len(starts) < 2:
        return x
    return HeadRanges(tuple(jnp.split(x, starts[1:], axis=axis)), starts)


def _heads(x: Heads, lo: int, hi: int, axis: int):
    if not isinstance(x, HeadRanges):
        return x if (lo, hi) == (0, x.shape[axis]) else jax.lax.slice_in_dim(x, lo, hi, axis=axis)
    if lo not in x.starts:
        raise ValueError(f"heads {lo}..{hi - 1} do not begin at a split {x.starts}")
    i = x.starts.index(lo)
    parts, at = [], lo
    while at < hi:
        parts.append(x.pieces[i])
        at, i = at + x.pieces[i].shape[axis], i + 1
    if at != hi:
        raise ValueError(f"heads {lo}..{hi - 1} do not end at a split {x.starts}")
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def reader_starts(layers: Sequence[LayerPlan]) -> dict[int, tuple[int, ...]]:
    """{source layer: the head ranges' starts} where the cross groups of `layers` read only part
    of a source's K/V heads (the cuts `split_heads` makes so that each group reads whole pieces)."""
    cuts: dict[int, set] = {}
    for plan in layers:
        for g in plan.cross:
            ranges = ([(layer, head, head + 1) for layer, head in g.mixture] or
                      [(g.source, g.source_heads[0], g.source_heads[-1] + 1)])
            for layer, lo, hi in ranges:
                cuts.setdefault(layer, {0}).update((lo, hi))
    return {layer: tuple(sorted(c)) for layer, c in cuts.items()}


def borrowed_kv(earlier: Sequence[KV], group: CrossGroup, axis: int = HEAD_AXIS) -> KV:
    """The source layer's K/V heads that `group`'s cross heads read."""
    lo, hi = group.source_heads[0], group.source_heads[-1] + 1  # always a contiguous range
    k, v = earlier[group.source]
    return _heads(k, lo, hi, axis), _heads(v, lo, hi, axis)


def mixed_kv(earlier: Sequence[KV], mixture, weights_NJ, axis: int = HEAD_AXIS) -> KV:
    """K/V of N routed heads: head n reads sum_j weights[n, j] * (K, V) of candidate j.

    A sum of J broadcast products, which XLA fuses into one pass over the candidates: stacking
    them first for one einsum copied every candidate's K/V (in decoding, its whole cache) on
    every call."""
    shape = [1] * 4
    shape[axis] = weights_NJ.shape[0]

    def mix(which: int):
        out = 0.0
        for j, (layer, head) in enumerate(mixture):
            x = _heads(earlier[layer][which], head, head + 1, axis)
            out = out + x * weights_NJ[:, j].astype(x.dtype).reshape(shape)
        return out
    return mix(0), mix(1)


def self_kv(own: KV, plan: LayerPlan, axis: int = HEAD_AXIS) -> KV:
    """The own K/V head of every self head (GQA: each group's head repeated for its queries)."""
    k, v = own
    if plan.n_k != plan.n_kv:  # the share-V cross heads' own K follow the exported heads
        k = _heads(k, 0, plan.n_kv, axis)
    if plan.n_kv != plan.n_self:
        index = np.asarray(plan.self_kv_heads)
        k, v = jnp.take(k, index, axis=axis), jnp.take(v, index, axis=axis)
    return k, v


def cross_kv(own: KV, earlier: Sequence[KV], plan: LayerPlan, route_w=None,
             axis: int = HEAD_AXIS) -> list[KV]:
    """K/V of every cross group in schedule order (`route_w` [n_cross, n_sources] for routes)."""
    out, k_at, row = [], plan.n_kv, 0
    for g in plan.cross:
        if g.mixture:
            k, v = mixed_kv(earlier, g.mixture, route_w[row:row + g.n_heads], axis)
        else:
            k, v = borrowed_kv(earlier, g, axis)
        if g.share == "v":  # its own K heads, in group order after the exported ones
            k, k_at = _heads(own[0], k_at, k_at + g.n_heads, axis), k_at + g.n_heads
        out.append((k, v))
        row += g.n_heads
    return out


def gather_kv(own: KV, earlier: Sequence[KV], plan: LayerPlan, route_w=None,
              axis: int = HEAD_AXIS) -> KV:
    """K/V for every query head of `plan`'s layer: self heads, then each cross group."""
    if not plan.cross:
        return self_kv(own, plan, axis)
    if plan.n_k != plan.n_kv:  # share-V: own K split where its readers' ranges begin
        share = [g.n_heads for g in plan.cross if g.share == "v"]
        own = (split_heads(own[0], (0, *np.cumsum([plan.n_kv] + share[:-1]).tolist()), axis),
               own[1])
    parts = (([self_kv(own, plan, axis)] if plan.n_self else [])
             + cross_kv(own, earlier, plan, route_w, axis))
    if len(parts) == 1:
        return parts[0]
    return (jnp.concatenate([k for k, _ in parts], axis=axis),
            jnp.concatenate([v for _, v in parts], axis=axis))


def _self_segments(own: KV, plan: LayerPlan, axis: int) -> list[tuple[int, KV]]:
    """(query heads, K/V) runs of the self heads whose groups have one size, K/V unrepeated."""
    if not plan.n_self:
        return []
    k, v = own
    if plan.n_k != plan.n_kv:
        k = _heads(k, 0, plan.n_kv, axis)
    if plan.n_kv == plan.n_self:
        return [(plan.n_self, (k, v))]
    sizes = [plan.self_kv_heads.count(j) for j in range(plan.n_kv)]
    runs, lo = [], 0
    for j in range(1, plan.n_kv + 1):
        if j == plan.n_kv or sizes[j] != sizes[lo]:
            runs.append((sizes[lo] * (j - lo), (_heads(k, lo, j, axis), _heads(v, lo, j, axis))))
            lo = j
    return runs


def reflex_attention(q_BTHD, own: KV, earlier: Sequence[KV], plan: LayerPlan, *, offset=0,
                     key_mask_BS=None, segment_ids_BT=None, dtype=None,
                     implementation: Optional[str] = None, kernels: KernelChoices = DEFAULT,
                     route_w=None, cached: bool = False):
    """Attention of one layer: every query head reads its K/V (see `gather_kv`); K/V are cast to
    `dtype` (default q's). `route_w`: the route weights of a routed layer (model/route.py).
    `cached`: own and earlier K/V are caches, [B, K, S, D]. `segment_ids_BT` (no cache): the
    document of each slot; every head, self or cross, sees only keys of its query's document,
    since a borrowed K/V slot holds the same token as the layer's own slot.

    Training and prefill give every query head its K/V in one [B, S, H, D] call (one big op, which
    the fused kernels of kernels/attention.py take; a prefill transposes what it gathered once).
    Cached decoding (one query) attends group by group over the head-major caches in place
    instead: a concatenation would copy every layer's whole cache on every token, which made `all` decode
    slower than `none` at batch 8 (bench.py); GQA groups are one grouped call each, without
    repeating the cache. Per head the math is the same.
    """
    dt = dtype or q_BTHD.dtype
    if cached and q_BTHD.shape[1] == 1:
        groups = _self_segments(own, plan, CACHE_HEAD_AXIS) + [
            (g.n_heads, kv) for g, kv in
            zip(plan.cross, cross_kv(own, earlier, plan, route_w, CACHE_HEAD_AXIS))]
        mask = attention_mask(1, groups[0][1][0].shape[2], offset, key_mask_BS)
        outs, h = [], 0
        for n, (k, v) in groups:
            outs.append(cached_query_attention(q_BTHD[:, :, h:h + n], k.astype(dt), v.astype(dt), mask))
            h += n
        return jnp.concatenate(outs, axis=2)
    if cached:  # gathered in the caches' layout, then one transpose to [B, S, H, D]
        k, v = (jnp.swapaxes(x, 1, 2)
                for x in gather_kv(own, earlier, plan, route_w, CACHE_HEAD_AXIS))
    else:
        k, v = gather_kv(own, earlier, plan, route_w)
    return multihead_attention(q_BTHD, k.astype(dt), v.astype(dt), offset=offset,
                               key_mask_BS=key_mask_BS, segment_ids_BT=segment_ids_BT,
                               implementation=implementation, kernels=kernels)


def kv_bytes_per_token(cfg, dtype=None) -> int:
    """KV-cache bytes one token adds: every layer's n_k K and n_v V heads of head_dim values in
    `dtype` (default the compute dtype). A layer that borrows all its heads adds nothing."""
    itemsize = jnp.dtype(dtype or cfg.compute_dtype).itemsize
    return sum(p.n_k + p.n_v for p in cfg.layers) * cfg.head_dim * itemsize


def init_cache(cfg, batch: int, length: int, dtype=None) -> Cache:
    """Zeroed per-layer cache holding what each layer computes, head-major: K [B, n_k, length, D]
    and V [B, n_v, length, D] (zero heads, so no memory, for a layer without K/V projection)."""
    dtype = dtype or cfg.compute_dtype
    return tuple((jnp.zeros((batch, p.n_k, length, cfg.head_dim), dtype),
                  jnp.zeros((batch, p.n_v, length, cfg.head_dim), dtype)) for p in cfg.layers)


def _kept_axes(shape_BKSD) -> list[int]:
    """The axes of a [B, K, S, D] cache that are not unit batch or head axes (slots always stay)."""
    return [a for a, d in enumerate(shape_BKSD) if d != 1 or a == 2]


def squeezed_cache_shape(shape_BKSD) -> tuple:
    """A cache array's shape without its unit batch or head axes: the shape XLA's dots read it in
    (they drop unit axes). A decode loop that carries and updates the cache in this shape updates
    it in place; in the [B, K, S, D] shape, at batch 1 or with one K/V head, XLA copies the whole
    cache several times per token (docs/bench.md has what that cost)."""
    return tuple(shape_BKSD[a] for a in _kept_axes(shape_BKSD))


def write_cache(cache_BKSD, new_BTKD, index):
    """The head-major cache [B, K, S, D] with this step's K or V [B, T, K, D] written at slots
    index..index+T-1, updated in its squeezed shape (see squeezed_cache_shape)."""
    full = cache_BKSD.shape
    keep = _kept_axes(full)
    new_BKTD = jnp.swapaxes(new_BTKD, 1, 2).astype(cache_BKSD.dtype)
    updated = jax.lax.dynamic_update_slice(
        cache_BKSD.reshape(squeezed_cache_shape(full)),
        new_BKTD.reshape(tuple(new_BKTD.shape[a] for a in keep)),
        tuple(index if a == 2 else 0 for a in keep))
    return updated.reshape(full)


def kv_cache_bytes(cfg, batch: int, length: int, dtype=None) -> int:
    """Bytes of `init_cache(cfg, batch, length, dtype)`: batch * length * kv_bytes_per_token."""
    return batch * length * kv_bytes_per_token(cfg, dtype)
