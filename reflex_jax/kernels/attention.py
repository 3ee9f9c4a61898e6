"""Causal multi-head attention: the one dispatch function every attention call goes through.

`multihead_attention` picks, by backend and shape, between XLA's dot_product_attention (any
backend; cuDNN flash attention on NVIDIA GPUs with model.attention='cudnn') and the CPU kernels
of cpu_attention.py. Callers pass only the choice (`implementation`, `KernelChoices`).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from ..errors import ConfigError
from . import DEFAULT, KernelChoices
from .cpu_attention import (blockwise_causal_attention, causal_blocks, flash_query_block,
                            single_query_attention)


def attention_mask(t_len: int, s_len: int, offset, key_mask_BS: Optional[jax.Array]):
    """Boolean [B|1, 1, T, S] mask: query t (at slot offset+t) sees key slots <= offset+t."""
    q_slot = jnp.arange(t_len)[:, None] + offset
    mask = (jnp.arange(s_len)[None, :] <= q_slot)[None, None]
    if key_mask_BS is not None:
        mask = mask & key_mask_BS[:, None, None, :].astype(bool)
    return mask


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
                        implementation: Optional[str] = None, kernels: KernelChoices = DEFAULT):
    """Causal attention of T queries (at slots offset..offset+T-1) over S key slots.

    `implementation`: None (XLA, with the CPU kernels of cpu_attention.py where `kernels`
    allows) or "cudnn" (NVIDIA GPUs only)."""
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"model.attention='cudnn' needs an NVIDIA GPU, but JAX runs on "
                          f"{jax.default_backend()}; use --config.model.attention=xla.")
    t_len, s_len = q_BTHD.shape[1], k_BSHD.shape[1]
    on_cpu = implementation is None and jax.default_backend() == "cpu"
    if on_cpu and t_len == 1 and q_BTHD.shape[0] == 1:
        # measured (bench.py generation, 6x8 n_embd 512, 1024 cache slots): at batch 1 this takes
        # ~13 ms/token against ~17; at batch 8 the dense call below is faster, so it stays there
        return single_query_attention(q_BTHD, k_BSHD, v_BSHD,
                                       attention_mask(1, s_len, offset, key_mask_BS))
    if not isinstance(offset, int):
        return _dense_attention(q_BTHD, k_BSHD, v_BSHD, offset, key_mask_BS, implementation)
    end = min(s_len, offset + t_len)  # slots after the last query are never visible
    k_BSHD, v_BSHD = k_BSHD[:, :end], v_BSHD[:, :end]
    key_mask_BS = None if key_mask_BS is None else key_mask_BS[:, :end]
    block = flash_query_block(t_len) if on_cpu and kernels.blockwise_backward else 0
    if block and offset == 0 and end == t_len and key_mask_BS is None:  # training, plain prefill
        return blockwise_causal_attention(q_BTHD, k_BSHD, v_BSHD, block)
    n = causal_blocks(t_len) if on_cpu and kernels.attention_blocks else 1
    if n == 1:
        return _dense_attention(q_BTHD, k_BSHD, v_BSHD, offset, key_mask_BS, implementation)
    c = t_len // n  # query block i sees key slots < offset + (i + 1) * c only
    return jnp.concatenate(
        [_dense_attention(q_BTHD[:, i * c:(i + 1) * c], k_BSHD[:, :offset + (i + 1) * c],
                          v_BSHD[:, :offset + (i + 1) * c], offset + i * c,
                          None if key_mask_BS is None else key_mask_BS[:, :offset + (i + 1) * c],
                          implementation) for i in range(n)], axis=1)


