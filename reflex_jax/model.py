"""Flax Linen Reflex decoder: norm, MLP, attention, block, decoder (DESIGN §2-3).

Layers are an unrolled Python loop: every layer has its own head split, so `nn.scan` does not fit.
Each block returns its self-head K/V; later blocks receive the tuple of all earlier K/V.

The same code runs training/prefill (no cache) and cached decoding: with `cache` given, every layer
writes its new K/V into its own cache at `cache_index` and attends over the whole cache; cross heads
then read the *updated* caches of earlier layers, which the unrolled order has already written.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from .attention import KV, reflex_attention
from .config import ModelConfig

Cache = tuple[KV, ...]  # per layer (k_BSKD, v_BSKD), K = that layer's self heads


def _init(std: float, axes: tuple):
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


def _dot_f32(a, b, contract_a: tuple, contract_b: tuple):
    return jax.lax.dot_general(a, b, ((contract_a, contract_b), ((), ())),
                               preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _linear(x, kernel, bias, n_in: int):
    """x[..., in] . kernel[in, out] + bias[out] in x's dtype, accumulated in float32.

    Forward and backward are written out so that every matmul has operands in the compute dtype
    and a float32 result: XLA:CPU runs bf16 x bf16 -> f32 natively but bf16 x bf16 -> bf16 as an
    f32 matmul plus converts (about half the speed), and autodiff of a mixed dot would feed f32
    cotangents into the backward matmuls. The kernel and bias gradients come out in float32, the
    bias gradient as one f32-accumulated sum. In float32 this is exactly nn.DenseGeneral's math.
    """
    return _linear_fwd(x, kernel, bias, n_in)[0]


def _linear_fwd(x, kernel, bias, n_in):
    n_free = x.ndim - n_in
    y = _dot_f32(x, kernel.astype(x.dtype), tuple(range(n_free, x.ndim)), tuple(range(n_in)))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    # the kernel is a param (alive anyway): keep it, not a low-precision copy, for the backward
    return y.astype(x.dtype), (x, kernel, bias)


def _linear_bwd(n_in, res, g):
    x, kernel, bias = res
    g = g.astype(x.dtype)
    free = tuple(range(x.ndim - n_in))                 # x = [free..., in...]
    out = tuple(range(len(free), g.ndim))              # g = [free..., out...]
    dx = _dot_f32(g, kernel.astype(x.dtype), out, tuple(range(n_in, kernel.ndim)))
    dk = _dot_f32(x, g, free, free)
    db = None if bias is None else jnp.sum(g, axis=free, dtype=jnp.float32).astype(bias.dtype)
    return dx.astype(x.dtype), dk.astype(kernel.dtype), db


_linear.defvjp(_linear_fwd, _linear_bwd)


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
    logical axes), computed by `_linear`."""
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
        return _linear(x.astype(self.dtype), kernel, bias, self.n_in)


def _dense(cfg: ModelConfig, features, axes: tuple, std: float, name: str, axis=-1):
    features = (features,) if isinstance(features, int) else tuple(features)
    n_in = 1 if isinstance(axis, int) else len(axis)  # always the trailing axes here
    return Dense(features, n_in, cfg.bias, cfg.compute_dtype, cfg.params_dtype,
                 kernel_init=_init(std, axes), bias_init=_zeros(axes[-len(features):]), name=name)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        if cfg.mlp == "gelu":
            h = _dense(cfg, cfg.hidden, ("embed", "mlp"), 0.02, "fc")(x)
            h = jax.nn.gelu(h, approximate=True)  # GPT-2's gelu_new
        else:
            gate = _dense(cfg, cfg.hidden, ("embed", "mlp"), 0.02, "gate")(x)
            up = _dense(cfg, cfg.hidden, ("embed", "mlp"), 0.02, "up")(x)
            h = jax.nn.silu(gate) * up
        return _dense(cfg, cfg.n_embd, ("mlp", "embed"), _residual_std(cfg),
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


class Attention(nn.Module):
    """Q for all H heads, K/V only for this layer's n_self self heads, output from all H."""
    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x_BTE, earlier: Sequence[KV], positions_BT, cache: Optional[KV] = None,
                 cache_index=None, key_mask_BS=None):
        cfg, plan = self.cfg, self.cfg.layers[self.layer]
        H, K, D = cfg.n_head, plan.n_self, cfg.head_dim
        q = _dense(cfg, (H, D), ("embed", "heads", "head_dim"), 0.02, "q")(x_BTE)
        k = _dense(cfg, (K, D), ("embed", "kv_heads", "head_dim"), 0.02, "k")(x_BTE)
        v = _dense(cfg, (K, D), ("embed", "kv_heads", "head_dim"), 0.02, "v")(x_BTE)
        if cfg.pos_emb == "rope":
            # K is rotated once, here; cross heads' queries use the same positions, so borrowed
            # keys need no re-rotation.
            q = apply_rope(q, positions_BT, cfg.rope_theta)
            k = apply_rope(k, positions_BT, cfg.rope_theta)
        offset = 0
        if cache is not None:
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), (0, cache_index, 0, 0))
            offset = cache_index
        own = (k, v)
        dt = cfg.compute_dtype
        y = reflex_attention(q.astype(dt), own, earlier, plan, offset=offset,
                             key_mask_BS=key_mask_BS, dtype=dt,
                             implementation=None if cfg.attention == "xla" else cfg.attention)
        out = _dense(cfg, cfg.n_embd, ("heads", "head_dim", "embed"), _residual_std(cfg), "o",
                     axis=(-2, -1))(y)
        return out, own


class Block(nn.Module):
    cfg: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x, earlier, positions, cache, cache_index, key_mask, deterministic: bool):
        cfg = self.cfg
        a, own = Attention(cfg, self.layer, name="attn")(
            Norm(cfg, name="ln_1")(x), earlier, positions, cache, cache_index, key_mask)
        x = x + nn.Dropout(cfg.dropout)(a, deterministic=deterministic)
        m = MLP(cfg, name="mlp")(Norm(cfg, name="ln_2")(x))
        x = x + nn.Dropout(cfg.dropout)(m, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
        return x, own


def head_matrix(cfg: ModelConfig, params) -> jax.Array:
    """The [vocab, embed] matrix that turns final hidden states into logits."""
    return params["wte"] if cfg.tie_embeddings else params["lm_head"].T


class Decoder(nn.Module):
    """GPT-2 style decoder with reflex attention.

    `__call__(tokens_BT)` -> float32 logits [B, T, vocab]. With `cache` (see `init_cache`) it
    returns `(logits, new_cache)`; with `return_hidden=True` the final normed hidden states replace
    the logits (for losses that never materialise [B*T, vocab]).
    """
    cfg: ModelConfig
    remat: bool = False  # recompute block activations in the backward pass

    @nn.compact
    def __call__(self, tokens_BT, *, positions_BT=None, deterministic: bool = True,
                 cache: Optional[Cache] = None, cache_index=None, key_mask_BS=None,
                 return_hidden: bool = False):
        cfg = self.cfg
        B, T = tokens_BT.shape
        if cache is None and T > cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds model.block_size={cfg.block_size}; "
                             "feed at most block_size tokens (or train with a larger block_size).")
        if cache is not None and cache_index is None:
            cache_index = 0
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T)[None] + (cache_index or 0), (B, T))
        wte = self.param("wte", _init(0.02, ("vocab", "embed")),
                         (cfg.vocab_size, cfg.n_embd), cfg.params_dtype)
        x = jnp.take(wte, tokens_BT, axis=0).astype(cfg.compute_dtype)
        if cfg.pos_emb == "learned":
            wpe = self.param("wpe", _init(0.02, (None, "embed")),
                             (cfg.block_size, cfg.n_embd), cfg.params_dtype)
            x = x + jnp.take(wpe, positions_BT, axis=0).astype(cfg.compute_dtype)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)

        block_cls = Block
        if self.remat:
            block_cls = nn.remat(Block, static_argnums=(7,), prevent_cse=True)
        earlier: list[KV] = []
        for layer in range(cfg.n_layer):
            x, own = block_cls(cfg, layer, name=f"h_{layer}")(
                x, tuple(earlier), positions_BT, None if cache is None else cache[layer],
                cache_index, key_mask_BS, deterministic)
            earlier.append(own)
        h = Norm(cfg, name="ln_f")(x)
        head = wte
        if not cfg.tie_embeddings:
            head = self.param("lm_head", _init(0.02, ("embed", "vocab")),
                              (cfg.n_embd, cfg.vocab_size), cfg.params_dtype).T
        out = h if return_hidden else logits_from_hidden(h, head)
        return out if cache is None else (out, tuple(earlier))


def logits_from_hidden(h_BTE, head_VE):
    """Logits in float32 (accumulated in float32 even when h is bf16)."""
    return jnp.einsum("bte,ve->btv", h_BTE, head_VE.astype(h_BTE.dtype),
                      preferred_element_type=jnp.float32)


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
    """Zeroed per-layer cache holding only each layer's self heads: [B, length, n_self, D]."""
    dtype = dtype or cfg.compute_dtype
    return tuple((jnp.zeros((batch, length, p.n_self, cfg.head_dim), dtype),
                  jnp.zeros((batch, length, p.n_self, cfg.head_dim), dtype)) for p in cfg.layers)


def init_params(cfg: ModelConfig, rng, *, with_axes: bool = False):
    """Plain (unboxed) params; with `with_axes`, also the tree of logical-axis PartitionSpecs."""
    tokens = jnp.zeros((1, min(8, cfg.block_size)), jnp.int32)
    boxed = Decoder(cfg).init(rng, tokens)["params"]
    params = nn.meta.unbox(boxed)
    if with_axes:
        return params, nn.get_partition_spec(boxed)
    return params


def param_logical_axes(cfg: ModelConfig):
    """Logical-axis PartitionSpec tree for `cfg`'s params, without allocating any weights."""
    tokens = jnp.zeros((1, min(8, cfg.block_size)), jnp.int32)
    boxed = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.PRNGKey(0), tokens)["params"])
    return nn.get_partition_spec(boxed)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
