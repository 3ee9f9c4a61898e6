"""The reflex attention op: one causal attention call over [own self K/V ++ borrowed K/V].

Head order is the contract (DESIGN §2): query head h < n_self reads this layer's own K/V head h;
the following heads read, group by group in schedule order, the source layer's last c self heads.
Concatenating K/V in that order turns the whole layer into one ordinary multi-head attention.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from .config import CrossGroup, LayerPlan

KV = tuple[jax.Array, jax.Array]  # (k_BSKD, v_BSKD) of one layer's self heads


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


def attention_mask(t_len: int, s_len: int, offset, key_mask_BS: Optional[jax.Array]):
    """Boolean [B|1, 1, T, S] mask: query t (at slot offset+t) sees key slots <= offset+t."""
    q_slot = jnp.arange(t_len)[:, None] + offset
    mask = (jnp.arange(s_len)[None, :] <= q_slot)[None, None]
    if key_mask_BS is not None:
        mask = mask & key_mask_BS[:, None, None, :].astype(bool)
    return mask


def causal_blocks(t_len: int) -> int:
    """Query blocks for causal attention on CPU: blocks of >= 128 queries (at most 4), so that the
    all-masked upper-right key blocks are skipped (a quarter of the work at 2 blocks); 1 (one
    dense call) elsewhere. XLA:CPU computes dense attention over the full T x S."""
    if jax.default_backend() != "cpu" or t_len % 128:
        return 1
    return min(t_len // 128, 4)


def flash_query_block(t_len: int) -> int:
    """Query block size of `blockwise_causal_attention` on CPU (0: not used): 64 queries, or T/8
    for long sequences (the blocks are unrolled; 8 bounds the program size)."""
    if jax.default_backend() != "cpu" or t_len < 128 or t_len % 64:
        return 0
    block = max(64, t_len // 8)
    return block if t_len % block == 0 else 0


def _block_scores(q_BCHD, k_BSHD, lo: int, scale: float):
    """Scaled scores [B, H, C, S] of the queries at slots lo..lo+C-1 over key slots 0..S-1, with
    the causal mask (only the last C keys, the diagonal block, can be masked)."""
    s_BHCS = jnp.einsum("bqhd,bkhd->bhqk", q_BCHD, k_BSHD, preferred_element_type=jnp.float32)
    c, s_len = q_BCHD.shape[1], k_BSHD.shape[1]
    visible = jnp.arange(s_len)[None, :] <= jnp.arange(lo, lo + c)[:, None]
    return jnp.where(visible, s_BHCS * scale, -1e30)


def _blockwise_forward(q, k, v, block):
    """Per query block: softmax over the visible keys only; returns the output and, per block,
    the log-sum-exp of the scores (all the backward needs besides q, k, v and the output)."""
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for lo in range(0, q.shape[1], block):
        hi = lo + block
        s = _block_scores(q[:, lo:hi], k[:, :hi], lo, scale)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        l_sum = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(q.dtype), v[:, :hi],
                       preferred_element_type=jnp.float32)
        outs.append((o / jnp.swapaxes(l_sum, 1, 2)).astype(q.dtype))
        lses.append(m + jnp.log(l_sum))
    return jnp.concatenate(outs, axis=1), lses


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def blockwise_causal_attention(q_BTHD, k_BTHD, v_BTHD, block: int):
    """Causal self-attention (T queries over the same T slots) computed in query blocks that
    skip the fully masked keys, with the backward written out FlashAttention-style (scores
    recomputed from the saved log-sum-exp; rowsum(dP * P) taken as rowsum(dO * O)). XLA:CPU
    autodiff of the blocked dense call fuses the softmax-backward reduction into a slow matmul;
    measured at batch 8, T 256, 8 heads of 64, bf16, forward + backward: 24-26 ms against 42-56
    (3-13% of the train step, bench.py --ablation). Operands in q's dtype, accumulation f32."""
    return _blockwise_forward(q_BTHD, k_BTHD, v_BTHD, block)[0]


def _blockwise_fwd(q, k, v, block):
    o, lses = _blockwise_forward(q, k, v, block)
    return o, (q, k, v, o, lses)


def _blockwise_bwd(block, res, do):
    q, k, v, o, lses = res
    f32, dt = jnp.float32, q.dtype
    scale = q.shape[-1] ** -0.5
    delta_BHT = jnp.einsum("bqhd,bqhd->bhq", do.astype(f32), o.astype(f32))[..., None]
    dq, dk, dv = [], jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)
    for i, lo in enumerate(range(0, q.shape[1], block)):
        hi = lo + block
        p = jnp.exp(_block_scores(q[:, lo:hi], k[:, :hi], lo, scale) - lses[i])
        do_i = do[:, lo:hi]
        dv = dv.at[:, :hi].add(jnp.einsum("bhqk,bqhd->bkhd", p.astype(dt), do_i,
                                          preferred_element_type=f32))
        dp = jnp.einsum("bqhd,bkhd->bhqk", do_i, v[:, :hi], preferred_element_type=f32)
        ds = (p * (dp - delta_BHT[:, :, lo:hi]) * scale).astype(dt)
        dq.append(jnp.einsum("bhqk,bkhd->bqhd", ds, k[:, :hi], preferred_element_type=f32))
        dk = dk.at[:, :hi].add(jnp.einsum("bhqk,bqhd->bkhd", ds, q[:, lo:hi],
                                          preferred_element_type=f32))
    return jnp.concatenate(dq, axis=1).astype(dt), dk.astype(k.dtype), dv.astype(v.dtype)


blockwise_causal_attention.defvjp(_blockwise_fwd, _blockwise_bwd)


def _single_query_attention(q_B1HD, k_BSHD, v_BSHD, mask):
    """One query (cached decoding, batch 1) as two plain matmuls over the cache viewed as
    [S, H*D]: the query becomes a block-diagonal [H, H*D] matrix (H times the FLOPs, which are
    tiny here), so K and V are read in place. A batched per-head dot would first copy the whole
    cache into [B, H, S, D] on every step, and a multiply + reduce over S is slow on XLA:CPU."""
    f32 = jnp.float32
    B, S, H, D = k_BSHD.shape
    dt = q_B1HD.dtype
    eye_HH = jnp.eye(H, dtype=dt)
    q_BHX = (q_B1HD[:, 0, None, :, :] * eye_HH[None, :, :, None]).reshape(B, H, H * D)
    scale = 1.0 / float(D) ** 0.5
    s_BHS = jax.lax.dot_general(q_BHX, k_BSHD.reshape(B, S, H * D).astype(dt),
                                (((2,), (2,)), ((0,), (0,))), preferred_element_type=f32) * scale
    s_BHS = jnp.where(mask[:, 0], s_BHS, jnp.finfo(f32).min)  # mask [B|1, 1, 1, S]
    p_BHS = jax.nn.softmax(s_BHS, axis=-1).astype(dt)
    o_BHX = jax.lax.dot_general(p_BHS, v_BSHD.reshape(B, S, H * D).astype(dt),
                                (((2,), (1,)), ((0,), (0,))), preferred_element_type=f32)
    o_BHD = o_BHX.reshape(B, H * H, D)[:, ::H + 1]  # the diagonal blocks: head h of query h
    return o_BHD[:, None].astype(dt)


def _dense_attention(q_BTHD, k_BSHD, v_BSHD, offset, key_mask_BS, implementation):
    t_len, s_len = q_BTHD.shape[1], k_BSHD.shape[1]
    if key_mask_BS is None and t_len == s_len and isinstance(offset, int) and offset == 0:
        return jax.nn.dot_product_attention(q_BTHD, k_BSHD, v_BSHD, is_causal=True,
                                            implementation=implementation)
    # masked calls (cached decoding, padded prompts) stay on XLA: cuDNN's flash attention takes
    # the plain causal case of training and prefill
    mask = attention_mask(t_len, s_len, offset, key_mask_BS)
    return jax.nn.dot_product_attention(q_BTHD, k_BSHD, v_BSHD, mask=mask, implementation=None)


def multihead_attention(q_BTHD, k_BSHD, v_BSHD, *, offset=0, key_mask_BS=None,
                        implementation: Optional[str] = None):
    """Causal attention of T queries (at slots offset..offset+T-1) over S key slots.

    `implementation`: None (XLA, with the CPU fast paths below) or "cudnn" (NVIDIA GPUs only)."""
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU, but JAX runs on "
                         f"{jax.default_backend()}; use --config.model.attention=xla.")
    t_len, s_len = q_BTHD.shape[1], k_BSHD.shape[1]
    on_cpu = implementation is None and jax.default_backend() == "cpu"
    if on_cpu and t_len == 1 and q_BTHD.shape[0] == 1:
        # measured (bench.py generation, 6x8 n_embd 512, 1024 cache slots): at batch 1 this takes
        # ~13 ms/token against ~17; at batch 8 the dense call below is faster, so it stays there
        return _single_query_attention(q_BTHD, k_BSHD, v_BSHD,
                                       attention_mask(1, s_len, offset, key_mask_BS))
    if not isinstance(offset, int):
        return _dense_attention(q_BTHD, k_BSHD, v_BSHD, offset, key_mask_BS, implementation)
    end = min(s_len, offset + t_len)  # slots after the last query are never visible
    k_BSHD, v_BSHD = k_BSHD[:, :end], v_BSHD[:, :end]
    key_mask_BS = None if key_mask_BS is None else key_mask_BS[:, :end]
    block = flash_query_block(t_len) if on_cpu else 0
    if block and offset == 0 and end == t_len and key_mask_BS is None:  # training, plain prefill
        return blockwise_causal_attention(q_BTHD, k_BSHD, v_BSHD, block)
    n = causal_blocks(t_len) if on_cpu else 1
    if n == 1:
        return _dense_attention(q_BTHD, k_BSHD, v_BSHD, offset, key_mask_BS, implementation)
    c = t_len // n  # query block i sees key slots < offset + (i + 1) * c only
    return jnp.concatenate(
        [_dense_attention(q_BTHD[:, i * c:(i + 1) * c], k_BSHD[:, :offset + (i + 1) * c],
                          v_BSHD[:, :offset + (i + 1) * c], offset + i * c,
                          None if key_mask_BS is None else key_mask_BS[:, :offset + (i + 1) * c],
                          implementation) for i in range(n)], axis=1)


def reflex_attention(q_BTHD, own: KV, earlier: Sequence[KV], plan: LayerPlan, *, offset=0,
                     key_mask_BS=None, dtype=None, implementation: Optional[str] = None):
    """Attention of one layer: query head h reads own K/V head h (h < n_self), later heads read
    their cross group's source K/V (see `gather_kv`); K/V are cast to `dtype` (default q's).

    Prefill/training concatenate K/V into one [B, S, H, D] call (one big op). Cached decoding
    (one query) attends group by group over the caches in place instead: the concatenation would
    copy every layer's whole cache on every token, which made `all` decode slower than `none` at
    batch 8 (bench.py). Per head the math is the same in both forms.
    """
    dt = dtype or q_BTHD.dtype
    if q_BTHD.shape[1] != 1 or not plan.cross:
        k, v = gather_kv(own, earlier, plan)
        return multihead_attention(q_BTHD, k.astype(dt), v.astype(dt), offset=offset,
                                   key_mask_BS=key_mask_BS, implementation=implementation)
    groups = [(own, plan.n_self)] + [(borrowed_kv(earlier, g), g.n_heads) for g in plan.cross]
    outs, h = [], 0
    for (k, v), n in groups:
        outs.append(multihead_attention(q_BTHD[:, :, h:h + n], k.astype(dt), v.astype(dt),
                                        offset=offset, key_mask_BS=key_mask_BS,
                                        implementation=implementation))
        h += n
    return jnp.concatenate(outs, axis=2)
