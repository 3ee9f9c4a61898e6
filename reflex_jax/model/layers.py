"""The decoder's layers: norm, linear, MLP, rotary positions, reflex attention, block.

Every module takes the frozen ModelConfig; the parameter names, shapes, initialisers and logical
axes are those of flax's nn.DenseGeneral-based GPT-2 (the converters and checkpoints rely on them).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..kernels import DEFAULT, KernelChoices
from ..kernels.linear import linear
from .config import ModelConfig
from .kv import KV, reflex_attention, write_cache
from .route import route_init_logits, softmax_weights


def normal_init(std: float, axes: tuple):
    """A normal(0, std) initializer whose parameter carries the logical `axes` (for sharding)."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def _zeros(axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def _residual_std(cfg: ModelConfig) -> float:
    return 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2: residual projections scaled by 1/sqrt(2L)


class Norm(nn.Module):
    """RMSNorm or LayerNorm, computed in float32, output in the compute dtype."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        x32 = x.astype(jnp.float32)
        scale = self.param("scale", _ones(("norm",)), (cfg.n_embd,), cfg.params_dtype)
        if cfg.norm == "rmsnorm":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + cfg.norm_eps)
        else:
            mean = jnp.mean(x32, -1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
        y = y * scale.astype(jnp.float32)
        if cfg.norm == "layernorm" and cfg.bias:
            y = y + self.param("bias", _zeros(("norm",)), (cfg.n_embd,),
                               cfg.params_dtype).astype(jnp.float32)
        return y.astype(cfg.compute_dtype)


def _flat_init(init, flat_shape):
    """Initialise as the flat matrix/vector and reshape, as nn.DenseGeneral does (same values)."""
    def wrapped(rng, shape, dtype=jnp.float32):
        value = init(rng, flat_shape, dtype)
        if isinstance(value, nn.meta.AxisMetadata):
            return nn.meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
        return jnp.reshape(value, shape)
    return wrapped


class Dense(nn.Module):
    """nn.DenseGeneral over the trailing `n_in` input axes (same param names, shapes, init and
    logical axes), computed by kernels/linear.py."""
    features: tuple
    n_in: int
    use_bias: bool
    dtype: Any
    param_dtype: Any
    kernel_init: Callable
    bias_init: Callable

    @nn.compact
    def __call__(self, x):
        in_shape, features = tuple(x.shape[x.ndim - self.n_in:]), tuple(self.features)
        n_out = int(math.prod(features))
        kernel = self.param("kernel", _flat_init(self.kernel_init, (int(math.prod(in_shape)), n_out)),
                            in_shape + features, self.param_dtype)
        bias = (self.param("bias", _flat_init(self.bias_init, (n_out,)), features, self.param_dtype)
                if self.use_bias else None)
        return linear(x.astype(self.dtype), kernel, bias, self.n_in)


def _dense(cfg: ModelConfig, kernels: KernelChoices, features, axes: tuple, std: float,
           name: str, axis=-1):
    """A linear layer over the trailing input axis (or axes); `kernels.f32_linear` picks
    kernels/linear.py, otherwise flax's nn.DenseGeneral (autodiff; same params)."""
    features = (features,) if isinstance(features, int) else tuple(features)
    kernel_init, bias_init = normal_init(std, axes), _zeros(axes[-len(features):])
    if not kernels.f32_linear:
        return nn.DenseGeneral(features, axis=axis, use_bias=cfg.bias, dtype=cfg.compute_dtype,
                               param_dtype=cfg.params_dtype, kernel_init=kernel_init,
                               bias_init=bias_init, name=name)
    n_in = 1 if isinstance(axis, int) else len(axis)  # always the trailing axes here
    return Dense(features, n_in, cfg.bias, cfg.compute_dtype, cfg.params_dtype,
                 kernel_init=kernel_init, bias_init=bias_init, name=name)


class MLP(nn.Module):
    cfg: ModelConfig
    kernels: KernelChoices = DEFAULT

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        if cfg.mlp == "gelu":
            h = _dense(cfg, self.kernels, cfg.hidden, ("embed", "mlp"), 0.02, "fc")(x)
            h = jax.nn.gelu(h, approximate=True)  # GPT-2's gelu_new
        else:
            gate = _dense(cfg, self.kernels, cfg.hidden, ("embed", "mlp"), 0.02, "gate")(x)
            up = _dense(cfg, self.kernels, cfg.hidden, ("embed", "mlp"), 0.02, "up")(x)
            h = jax.nn.silu(gate) * up
        return _dense(cfg, self.kernels, cfg.n_embd, ("mlp", "embed"), _residual_std(cfg),
                      "proj" if cfg.mlp == "gelu" else "down")(h)


def apply_rope(x_BTHD, positions_BT, theta: float):
    """Rotary embedding (half-split / GPT-NeoX layout), computed in float32."""
    d = x_BTHD.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angles = positions_BT.astype(jnp.float32)[..., None] * inv_freq  # B T D/2
    sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]
    x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)


def _constant(value, axes: tuple):
    """A parameter initialised to a fixed array (route logits, value-residual mix)."""
    value = jnp.asarray(value)
    return nn.with_logical_partitioning(lambda rng, shape, dtype: value.astype(dtype), axes)


class Attention(nn.Module):
    """Q for the layer's query heads, K/V only for the heads it computes (model/kv.py), output
    from all its query heads; returns (out, own K/V, this step's fresh V)."""
    cfg: ModelConfig
    layer: int
    kernels: KernelChoices = DEFAULT

    @nn.compact
    def __call__(self, x_BTE, earlier: Sequence[KV], positions_BT, cache: Optional[KV] = None,
                 cache_index=None, key_mask_BS=None, v_first=None, segment_ids_BT=None,
                 carry_kv=None):
        cfg, plan = self.cfg, self.cfg.layers[self.layer]
        D, dt = cfg.head_dim, cfg.compute_dtype
        dense = functools.partial(_dense, cfg, self.kernels)
        q_BTHD = dense((plan.n_query, D), ("embed", "heads", "head_dim"), 0.02, "q")(x_BTE)
        k_BSKD, v_BSKD = (
            dense((n, D), ("embed", "kv_heads", "head_dim"), 0.02, name)(x_BTE) if n
            else jnp.zeros(x_BTE.shape[:2] + (0, D), dt)  # a borrowing layer: no K/V projection
            for n, name in ((plan.n_k, "k"), (plan.n_v, "v")))
        if cfg.pos_emb == "rope":
            # K is rotated once, here; cross heads' queries use the same positions, so borrowed
            # keys need no re-rotation.
            q_BTHD = apply_rope(q_BTHD, positions_BT, cfg.rope_theta)
            k_BSKD = apply_rope(k_BSKD, positions_BT, cfg.rope_theta)
        if carry_kv is not None:  # a diagonal scanned run (model/scan.py): the heads this
            keep_H, k_carry, v_carry = carry_kv  # layer does not compute come from the carry
            keep = keep_H[None, None, :, None]
            k_BSKD = jnp.where(keep, k_BSKD, k_carry.astype(k_BSKD.dtype))
            v_BSKD = jnp.where(keep, v_BSKD, v_carry.astype(v_BSKD.dtype))
        v_fresh = v_BSKD
        if cfg.value_residual and self.layer and plan.n_v:
            v_BSKD = self._value_residual(v_BSKD, v_first, plan.n_v)
        offset = 0
        own = (k_BSKD, v_BSKD)
        if cache is not None:  # write this step's K/V into the head-major cache; attend over it all
            own = tuple(write_cache(old, new, cache_index) if n else old
                        for old, new, n in ((cache[0], k_BSKD, plan.n_k), (cache[1], v_BSKD, plan.n_v)))
            offset = cache_index
        route_w = None
        if plan.routed:
            logits = self.param("route_logits", _constant(route_init_logits(plan), (None, None)),
                                (plan.n_cross, len(plan.cross[0].mixture)), cfg.params_dtype)
            route_w = softmax_weights(logits)
        y_BTHD = reflex_attention(q_BTHD.astype(dt), own, earlier, plan, offset=offset,
                                  key_mask_BS=key_mask_BS, segment_ids_BT=segment_ids_BT, dtype=dt,
                                  implementation=cfg.attention,
                                  kernels=self.kernels, route_w=route_w,
                                  cached=cache is not None)
        out_BTE = dense(cfg.n_embd, ("heads", "head_dim", "embed"), _residual_std(cfg), "o",
                        axis=(-2, -1))(y_BTHD)
        return out_BTE, own, v_fresh

    def _value_residual(self, v_BSKD, v_first, n_v: int):
        """ResFormer: lambda1 * V + lambda2 * V of layer 0 (its first n_v heads, this step's
        tokens); `value_mix` = (lambda1, lambda2) starts at (0.5, 0.5)."""
        mix = self.param("value_mix", _constant([0.5, 0.5], (None,)), (2,),
                         self.cfg.params_dtype).astype(v_BSKD.dtype)
        return mix[0] * v_BSKD + mix[1] * v_first[:, :, :n_v].astype(v_BSKD.dtype)


class Block(nn.Module):
    cfg: ModelConfig
    layer: int
    kernels: KernelChoices = DEFAULT

    @nn.compact
    def __call__(self, x_BTE, earlier: Sequence[KV], positions_BT, cache: Optional[KV],
                 cache_index, key_mask_BS, deterministic: bool, v_first=None, segment_ids_BT=None,
                 carry_kv=None):
        """(new residual stream, this layer's own K/V for the later layers, its fresh V).
        `carry_kv` (keep [n_head] bool, K, V [B, S, n_head, D]): a diagonal scanned run's carry
        (model/scan.py), which replaces the K/V heads where keep is False."""
        cfg = self.cfg
        a_BTE, own, v_fresh = Attention(cfg, self.layer, self.kernels, name="attn")(
            Norm(cfg, name="ln_1")(x_BTE), earlier, positions_BT, cache, cache_index, key_mask_BS,
            v_first, segment_ids_BT, carry_kv)
        x_BTE = x_BTE + nn.Dropout(cfg.dropout)(a_BTE, deterministic=deterministic)
        m_BTE = MLP(cfg, self.kernels, name="mlp")(Norm(cfg, name="ln_2")(x_BTE))
        x_BTE = x_BTE + nn.Dropout(cfg.dropout)(m_BTE, deterministic=deterministic)
        x_BTE = nn.with_logical_constraint(x_BTE, ("batch", "seq", "embed"))
        return x_BTE, own, v_fresh


