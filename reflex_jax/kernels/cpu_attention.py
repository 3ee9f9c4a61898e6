"""CPU attention kernels: causal attention in query blocks, with a written-out backward. (Cached
decoding reads head-major caches in place on every platform: kernels/attention.py's
`cached_query_attention`.)

XLA:CPU computes dense attention over the full T x S score matrix, masked half included; these
skip the fully masked key blocks. The dispatch (kernels/attention.py) calls them only for steps
compiled for a CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def causal_blocks(t_len: int) -> int:
    """Query blocks for causal attention on CPU: blocks of >= 128 queries (at most 4), so that the
    all-masked upper-right key blocks are skipped (a quarter of the work at 2 blocks); 1 (one
    dense call) when T is not a multiple of 128. XLA:CPU computes dense attention over the full
    T x S."""
    if t_len % 128:
        return 1
    return min(t_len // 128, 4)


def flash_query_block(t_len: int) -> int:
    """Query block size of `blockwise_causal_attention` on CPU (0: not used): 64 queries, or T/8
    for long sequences (the blocks are unrolled; 8 bounds the program size)."""
    if t_len < 128 or t_len % 64:
        return 0
    block = max(64, t_len // 8)
    return block if t_len % block == 0 else 0


def _block_scores(q_BCHD, k_BSHD, lo: int, scale: float, segment_ids_BT=None):
    """Scaled scores [B, H, C, S] of the queries at slots lo..lo+C-1 over key slots 0..S-1, with
    the causal mask (only the last C keys, the diagonal block, can be masked) and, with
    `segment_ids_BT` (of all T slots), the document mask: a key only in the query's document."""
    s_BHCS = jnp.einsum("bqhd,bkhd->bhqk", q_BCHD, k_BSHD, preferred_element_type=jnp.float32)
    c, s_len = q_BCHD.shape[1], k_BSHD.shape[1]
    visible = (jnp.arange(s_len)[None, :] <= jnp.arange(lo, lo + c)[:, None])[None, None]
    if segment_ids_BT is not None:
        same = segment_ids_BT[:, lo:lo + c, None] == segment_ids_BT[:, None, :s_len]
        visible = visible & same[:, None]
    return jnp.where(visible, s_BHCS * scale, -1e30)


def _blockwise_forward(q, k, v, segment_ids, block):
    """Per query block: softmax over the visible keys only; returns the output and, per block,
    the log-sum-exp of the scores (all the backward needs besides q, k, v and the output)."""
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for lo in range(0, q.shape[1], block):
        hi = lo + block
        s = _block_scores(q[:, lo:hi], k[:, :hi], lo, scale, segment_ids)
        m = jnp.max(s, axis=-1, keepdims=True)
        p = jnp.exp(s - m)
        l_sum = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bhqk,bkhd->bqhd", p.astype(q.dtype), v[:, :hi],
                       preferred_element_type=jnp.float32)
        outs.append((o / jnp.swapaxes(l_sum, 1, 2)).astype(q.dtype))
        lses.append(m + jnp.log(l_sum))
    return jnp.concatenate(outs, axis=1), lses


def blockwise_causal_attention(q_BTHD, k_BTHD, v_BTHD, block: int, segment_ids_BT=None):
    """Causal self-attention (T queries over the same T slots) computed in query blocks that
    skip the fully masked keys, with the backward written out FlashAttention-style (scores
    recomputed from the saved log-sum-exp; rowsum(dP * P) taken as rowsum(dO * O)). XLA:CPU
    autodiff of the blocked dense call fuses the softmax-backward reduction into a slow matmul
    (docs/bench.md has the op and step times). Operands in q's dtype, accumulation f32.
    `segment_ids_BT` (int [B, T]): a query sees only the keys of its own document."""
    if segment_ids_BT is None:
        return _blockwise(q_BTHD, k_BTHD, v_BTHD, None, block)
    return _blockwise(q_BTHD, k_BTHD, v_BTHD, segment_ids_BT.astype(jnp.int32), block)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blockwise(q_BTHD, k_BTHD, v_BTHD, segment_ids_BT, block: int):
    return _blockwise_forward(q_BTHD, k_BTHD, v_BTHD, segment_ids_BT, block)[0]


def _blockwise_fwd(q, k, v, segment_ids, block):
    o, lses = _blockwise_forward(q, k, v, segment_ids, block)
    return o, (q, k, v, segment_ids, o, lses)


def _blockwise_bwd(block, res, do):
    q, k, v, segment_ids, o, lses = res
    f32, dt = jnp.float32, q.dtype
    scale = q.shape[-1] ** -0.5
    delta_BHT = jnp.einsum("bqhd,bqhd->bhq", do.astype(f32), o.astype(f32))[..., None]
    dq, dk, dv = [], jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)
    for i, lo in enumerate(range(0, q.shape[1], block)):
        hi = lo + block
        p = jnp.exp(_block_scores(q[:, lo:hi], k[:, :hi], lo, scale, segment_ids) - lses[i])
        do_i = do[:, lo:hi]
        dv = dv.at[:, :hi].add(jnp.einsum("bhqk,bqhd->bkhd", p.astype(dt), do_i,
                                          preferred_element_type=f32))
        dp = jnp.einsum("bqhd,bkhd->bhqk", do_i, v[:, :hi], preferred_element_type=f32)
        ds = (p * (dp - delta_BHT[:, :, lo:hi]) * scale).astype(dt)
        dq.append(jnp.einsum("bhqk,bkhd->bqhd", ds, k[:, :hi], preferred_element_type=f32))
        dk = dk.at[:, :hi].add(jnp.einsum("bhqk,bqhd->bkhd", ds, q[:, lo:hi],
                                          preferred_element_type=f32))
    return (jnp.concatenate(dq, axis=1).astype(dt), dk.astype(k.dtype), dv.astype(v.dtype),
            None)  # the segment ids are integers: no cotangent


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
