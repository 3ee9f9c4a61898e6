"""The Reflex decoder: embeddings, the unrolled blocks, the final norm and the LM head.

Layers are an unrolled Python loop: every layer has its own head split, so `nn.scan` does not fit.
Each block returns the K/V it computed; later blocks receive the tuple of all earlier K/V
(model/kv.py says which head reads which), and with `value_residual` also layer 0's fresh V.
Runs of layers that repeat (same shapes, same relative sources) are one `jax.lax.scan` instead,
with the same params and the same results (model/scan.py, `ModelConfig.scan_layers`).

The same code runs training/prefill (no cache) and cached decoding: with `cache` given, every layer
writes its new K/V into its own cache at `cache_index` and attends over the whole cache; cross heads
then read the *updated* caches of earlier layers, which the unrolled order has already written.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..errors import ConfigError
from ..kernels import DEFAULT, KernelChoices
from .config import ModelConfig
from .kv import KV, Cache, reader_starts, split_heads
from .layers import Block, Norm, normal_init
from .remat import checkpoint_policy, remat_policy
from .scan import (Diagonal, diagonal_runs, run_diagonal, run_scan, scan_runs, uses_diagonal,
                   uses_scan)

# flax's remat marks static arguments by position only (no names; `self` is 0): find
# Block.__call__'s `deterministic` by name, so that a change to that signature cannot mark another
# argument static. The blocks are called with every argument positional.
_DETERMINISTIC_ARGNUM = list(inspect.signature(Block.__call__).parameters).index("deterministic")


def head_matrix(cfg: ModelConfig, params) -> jax.Array:
    """The [vocab, embed] matrix that turns final hidden states into logits."""
    return params["wte"] if cfg.tie_embeddings else params["lm_head"].T


class Decoder(nn.Module):
    """GPT-2 style decoder with reflex attention.

    `__call__(tokens_BT)` -> float32 logits [B, T, vocab]. With `cache` (see `init_cache`) it
    returns `(logits, new_cache)`; with `return_hidden=True` the final normed hidden states replace
    the logits (for losses that never materialise [B*T, vocab]).

    Packed documents (training and scoring, no cache): `segment_ids_BT` (int, the document of each
    token) keeps every head of every layer, self or cross, inside its query's document, and
    `positions_BT` restarts at 0 at each document start (learned positions and RoPE read it).
    Without them a row is one document at positions 0..T-1.
    """
    cfg: ModelConfig
    remat: Union[bool, str] = False  # a policy of model/remat.py (True: block, False: none)
    kernels: KernelChoices = DEFAULT

    @nn.compact
    def __call__(self, tokens_BT, *, positions_BT=None, segment_ids_BT=None,
                 deterministic: bool = True, cache: Optional[Cache] = None, cache_index=None,
                 key_mask_BS=None, return_hidden: bool = False):
        cfg = self.cfg
        B, T = tokens_BT.shape
        if cache is None and T > cfg.block_size:
            raise ConfigError(f"sequence length {T} exceeds model.block_size={cfg.block_size}; "
                             "feed at most block_size tokens (or train with a larger block_size).")
        if cache is not None and segment_ids_BT is not None:
            raise ConfigError("segment_ids_BT is for training and scoring without a cache; a cached "
                              "call attends over one document per row (use key_mask_BS for padding).")
        for name, x in (("positions_BT", positions_BT), ("segment_ids_BT", segment_ids_BT)):
            if x is not None and tuple(x.shape) != (B, T):
                raise ConfigError(f"{name} has shape {tuple(x.shape)}; it must match the tokens' "
                                  f"{(B, T)}.")
        if cache is not None and cache_index is None:
            cache_index = 0
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(T)[None] + (cache_index or 0), (B, T))
        wte = self.param("wte", normal_init(0.02, ("vocab", "embed")),
                         (cfg.vocab_size, cfg.n_embd), cfg.params_dtype)
        x = jnp.take(wte, tokens_BT, axis=0).astype(cfg.compute_dtype)
        if cfg.pos_emb == "learned":
            wpe = self.param("wpe", normal_init(0.02, (None, "embed")),
                             (cfg.block_size, cfg.n_embd), cfg.params_dtype)
            x = x + jnp.take(wpe, positions_BT, axis=0).astype(cfg.compute_dtype)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)

        block_cls = Block
        policy = remat_policy(self.remat)
        jax_policy = "none"
        if policy != "none":
            jax_policy = checkpoint_policy(policy, self.kernels.resolved_platform())
            block_cls = nn.remat(Block, static_argnums=(_DETERMINISTIC_ARGNUM,), prevent_cse=True,
                                 policy=jax_policy)
        runs = {}
        platform = self.kernels.resolved_platform()
        if not self.is_initializing() and uses_scan(cfg.scan_layers, cache is not None, T, platform):
            runs = {r.start: r for r in scan_runs(cfg)}
            if uses_diagonal(cfg.scan_layers, cache is not None, platform):
                runs.update({r.start: r for r in diagonal_runs(cfg)})
        # the unrolled layers' reads of their sources' head ranges; without a cache a source's K/V
        # is split where those ranges begin and end (model/kv.py's HeadRanges), so no reader's
        # gradient is padded to the source's size
        starts = reader_starts(_unrolled_plans(cfg, runs.values()))
        needed = (set(range(cfg.n_layer)) if cache is not None
                  else _read_outside_runs(starts, runs.values()))
        if cache is not None:
            starts = {}
        params = nn.meta.unbox(self.variables.get("params", {})) if runs else {}
        stream = self.scope.rngs.get("dropout") if runs and not deterministic else None
        earlier: list[Optional[KV]] = []
        readable: list = []  # what the unrolled blocks read: `earlier`, split at `starts`
        v_first = None  # layer 0's V of these tokens, for value_residual
        layer = 0
        while layer < cfg.n_layer:
            run = runs.get(layer)
            if isinstance(run, Diagonal):
                x, kvs = run_diagonal(run, cfg, self.kernels, params, x, earlier, positions_BT,
                                      key_mask_BS, deterministic, segment_ids_BT, jax_policy,
                                      stream, needed)
            elif run is not None:
                x, kvs = run_scan(run, cfg, self.kernels, params, x, earlier, positions_BT, cache,
                                  cache_index, key_mask_BS, deterministic, v_first,
                                  segment_ids_BT, jax_policy, stream, needed)
            if run is not None:
                for own in kvs:
                    readable.append(_readable(own, starts.get(len(earlier))))
                    earlier.append(own)
                layer = run.stop
                continue
            x, own, v_fresh = block_cls(cfg, layer, self.kernels, name=f"h_{layer}")(
                x, tuple(readable), positions_BT, None if cache is None else cache[layer],
                cache_index, key_mask_BS, deterministic, v_first, segment_ids_BT)
            readable.append(_readable(own, starts.get(layer)))
            earlier.append(own)
            if layer == 0 and cfg.value_residual:
                v_first = v_fresh
            layer += 1
        h = Norm(cfg, name="ln_f")(x)
        head = wte
        if not cfg.tie_embeddings:
            head = self.param("lm_head", normal_init(0.02, ("embed", "vocab")),
                              (cfg.n_embd, cfg.vocab_size), cfg.params_dtype).T
        out = h if return_hidden else logits_from_hidden(h, head)
        return out if cache is None else (out, tuple(earlier))


def _unrolled_plans(cfg: ModelConfig, runs) -> list:
    inside = {layer for r in runs for layer in range(r.start, r.stop)}
    return [p for p in cfg.layers if p.layer not in inside]


def _readable(own: Optional[KV], starts: Optional[tuple]):
    """A layer's K/V as later unrolled layers read it (split at `starts` where given)."""
    if own is None or starts is None:
        return own
    return tuple(split_heads(x, starts) for x in own)


def _read_outside_runs(starts: dict, runs) -> set:
    """The layers whose K/V something outside a scanned run reads (without a cache): the sources
    the unrolled layers read (the keys of their `reader_starts`) and the layers a run reads from
    before it (its first window or carry)."""
    out = set(starts)
    for r in runs:
        out.update(r.reads_before())
    return out


def logits_from_hidden(h_BTE, head_VE):
    """Logits in float32 (accumulated in float32 even when h is bf16)."""
    return jnp.einsum("bte,ve->btv", h_BTE, head_VE.astype(h_BTE.dtype),
                      preferred_element_type=jnp.float32)


def _init_tokens(cfg: ModelConfig):
    """The dummy batch that `init` traces with: any length up to block_size gives the same params."""
    return jnp.zeros((1, min(8, cfg.block_size)), jnp.int32)


def boxed_params(model: Decoder, rng):
    """`model`'s freshly initialised params, boxed with their logical axes."""
    # the params do not depend on the attention backend, and XLA's traces on every platform
    xla = model.clone(cfg=dataclasses.replace(model.cfg, attention="xla"))
    return xla.init(rng, _init_tokens(model.cfg))["params"]


def init_params(cfg: ModelConfig, rng, *, with_axes: bool = False, model: Optional[Decoder] = None):
    """Plain (unboxed) params; with `with_axes`, also the tree of logical-axis PartitionSpecs."""
    boxed = boxed_params(model or Decoder(cfg), rng)
    params = nn.meta.unbox(boxed)
    if with_axes:
        return params, nn.get_partition_spec(boxed)
    return params


def abstract_params(cfg: ModelConfig):
    """ShapeDtypeStructs of `cfg`'s params, without allocating any weights."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def param_logical_axes(cfg: ModelConfig):
    """Logical-axis PartitionSpec tree for `cfg`'s params, without allocating any weights."""
    boxed = jax.eval_shape(lambda: boxed_params(Decoder(cfg), jax.random.PRNGKey(0)))
    return nn.get_partition_spec(boxed)


def count_params(params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
