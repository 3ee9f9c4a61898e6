"""Scanned runs of layers: the decoder's blocks in a `jax.lax.scan` where consecutive layers repeat.

Every layer has its own head split, so the decoder is an unrolled loop (model/decoder.py), and an
unrolled loop compiles in a time that grows with the depth. But most plans repeat: every layer of
`none` and `gqa:G`, every layer of `recent:c1,...` past its first len(c) layers, of `all` with
`reflex_window=w` past its first w layers, and `cla:G` in runs of G layers have the same shapes
and read the same *relative* sources (the last c exported heads of the layer k back). A run of
such layers is one scan whose body is one period of p layers, so it compiles once, whatever its
length; the layers in front of it (and any that repeat nothing) stay unrolled, unless they form a
diagonal loop (`Diagonal`: `all`'s first layers, whose cross heads each read the head of their
own index that an earlier layer computed last, scanned over one carried K/V).

The parameter tree does not change: the forward reads the run's `h_<layer>` params, stacks them
(one leading axis per run) and scans a functional apply of the very same `Block` over them, so
converters, checkpoints and sharding rules see the tree they always did. Under FSDP the stack is
one extra copy of the run's params (and of their gradients in the backward) per device, each
already split over the fsdp axis: 1/fsdp of the params, next to activations that are many times
that (docs/bench.md#compile-time).

What a scanned layer reads is exactly what it reads unrolled. The scan carries the residual stream
and a window of the K/V the body reads from before the period: entry e holds the last C_e exported
K/V heads of the layer e back (C_e the most any layer of the body reads from it, and at least what
the entry shifted e + p back needs), since a cross group always reads the last c exported heads of
its source. Each layer of the body runs with a *relative* plan whose sources index that window
and the period's own earlier layers. The full K/V of the run's layers come out as stacked scan
outputs only where a later layer or the cache needs them.

Dropout draws the same masks as unrolled: each layer's dropout keys are the ones flax derives for
`h_<layer>/Dropout_i` (computed before the scan, one per layer and call, and handed to the
block's dropout calls inside it). Remat policies (model/remat.py) checkpoint each layer inside the
body as the unrolled path checkpoints each block.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core.scope import LazyRng

from .config import ModelConfig
from .kv import CACHE_HEAD_AXIS, HEAD_AXIS
from .layers import Block
from .schedule import LayerPlan

SCAN_LAYERS = ("auto", "on", "off")
MAX_PERIOD = 4  # the longest period of layers a run's body may hold (cla:4 and below)


@dataclasses.dataclass(frozen=True)
class Run:
    """Layers start .. start + period * repeats - 1, scanned `repeats` times over a body of
    `period` layers; `window[e - 1]` = C_e, the K/V heads the carry keeps of the layer e back from
    the body's first layer; `plans[j]`: phase j's relative plan (sources index the window, then
    the period's layers)."""
    start: int
    period: int
    repeats: int
    window: tuple[int, ...]
    plans: tuple[LayerPlan, ...]

    @property
    def stop(self) -> int:
        return self.start + self.period * self.repeats

    def layers(self, phase: int) -> list[int]:
        return list(range(self.start + phase, self.stop, self.period))

    def reads_before(self) -> set:
        """The layers before the run whose K/V its first window holds."""
        return {self.start - e for e, n in enumerate(self.window, 1) if n and self.start - e >= 0}


@dataclasses.dataclass(frozen=True)
class Diagonal:
    """Layers start .. stop - 1 scanned over one carried K/V of n_head heads, where every layer's
    cross head h reads what the carry's head h holds: the K/V head h last computed by an earlier
    layer (`all`'s first layers: layer l has 8 - l self heads, and its cross head h reads head h
    of layer 7 - h). Each layer computes its own heads 0 .. n_self - 1 (its K/V projections
    padded with zero heads to n_head, whose outputs the carry replaces), attends over the merged
    K/V as over n_head self heads, and leaves the merge as the next layer's carry. `n_self[i]`:
    layer start + i's own heads; `init[h]`: the (layer, head) the carry's head h holds before the
    run, None where the first layer computes it."""
    start: int
    stop: int
    n_self: tuple[int, ...]
    init: tuple[Optional[tuple[int, int]], ...]

    def reads_before(self) -> set:
        return {src[0] for src in self.init if src is not None}


def _signature(cfg: ModelConfig, layer: int):
    """What a layer's computation depends on, relative to its position; None if it reads its
    sources by anything but "the last c exported heads" (a routed layer)."""
    plan = cfg.layers[layer]
    if plan.routed:
        return None
    groups = []
    for g in plan.cross:
        n_kv = cfg.layers[g.source].n_kv
        if g.source_heads != tuple(range(n_kv - g.n_heads, n_kv)):
            return None
        groups.append((layer - g.source, g.n_heads, g.share))
    value_mix = bool(cfg.value_residual and layer and plan.n_v)
    return (plan.n_self, plan.n_kv, plan.n_k, plan.n_v, tuple(groups), value_mix)


def _repeats(sigs, start: int, period: int) -> int:
    n = 0
    while start + (n + 1) * period <= len(sigs) and all(
            sigs[start + n * period + j] is not None
            and sigs[start + n * period + j] == sigs[start + j] for j in range(period)):
        n += 1
    return n


def _relative(cfg: ModelConfig, start: int, period: int) -> tuple[tuple[int, ...], tuple]:
    """The window C_1..C_W and the phases' relative plans of a run starting at `start`."""
    reads = [(j, start + j - g.source, g.n_heads) for j in range(period)
             for g in cfg.layers[start + j].cross]
    width = max([k - j for j, k, _ in reads] + [0])
    need = [max([c for j, k, c in reads if k - j == e] + [0]) for e in range(1, width + 1)]
    for e in range(width - period, 0, -1):  # entry e becomes entry e + p after a period
        need[e - 1] = max(need[e - 1], need[e - 1 + period])
    plans = []
    for j in range(period):
        plan = cfg.layers[start + j]
        cross = []
        for g in plan.cross:
            k = start + j - g.source
            heads = g.source_heads if k <= j else tuple(range(need[k - j - 1] - g.n_heads,
                                                              need[k - j - 1]))
            cross.append(dataclasses.replace(g, source=width + j - k, source_heads=heads))
        plans.append(dataclasses.replace(plan, cross=tuple(cross)))
    return tuple(need), tuple(plans)


@functools.lru_cache(maxsize=64)
def scan_runs(cfg: ModelConfig) -> tuple[Run, ...]:
    """The runs of `cfg`'s layers that a scan covers: from each layer on, the period (1 to
    MAX_PERIOD) that repeats over the most layers, at least twice; layers in no run are
    unrolled."""
    sigs = [_signature(cfg, layer) for layer in range(cfg.n_layer)]
    runs, layer = [], 0
    while layer < cfg.n_layer:
        best = max(((p * _repeats(sigs, layer, p), -p) for p in range(1, MAX_PERIOD + 1)),
                   default=(0, 0))
        covered, period = best[0], -best[1]
        if sigs[layer] is None or covered < 2 * period:
            layer += 1
            continue
        window, plans = _relative(cfg, layer, period)
        runs.append(Run(layer, period, covered // period, window, plans))
        layer += covered
    return tuple(runs)


def _reads(cfg: ModelConfig, layer: int) -> Optional[list]:
    """The (layer, K/V head) each of `layer`'s query heads reads, where every query head has its
    own K/V head (self heads first, then the cross groups' heads in order); None otherwise."""
    plan = cfg.layers[layer]
    if cfg.value_residual or not plan.classic or not plan.n_self or plan.n_query != cfg.n_head:
        return None
    return [(layer, h) for h in range(plan.n_self)] + [
        (g.source, j) for g in plan.cross for j in g.source_heads]


@functools.lru_cache(maxsize=64)
def diagonal_runs(cfg: ModelConfig) -> tuple[Diagonal, ...]:
    """Runs (at least 2 layers) of the layers outside `scan_runs` whose cross heads each read the
    head of the same index that an earlier layer computed last (see `Diagonal`)."""
    inside = {layer for r in scan_runs(cfg) for layer in range(r.start, r.stop)}
    found, layer = [], 0
    while layer < cfg.n_layer:
        start, carry, init, n_self = layer, None, None, []
        while layer < cfg.n_layer and layer not in inside:
            reads = _reads(cfg, layer)
            if reads is None:
                break
            own = cfg.layers[layer].n_self
            if carry is None:
                init = tuple(None if h < own else reads[h] for h in range(cfg.n_head))
                carry = list(init)
            elif any(reads[h] != carry[h] for h in range(own, cfg.n_head)):
                break
            carry[:own] = reads[:own]
            n_self.append(own)
            layer += 1
        if len(n_self) >= 2:
            found.append(Diagonal(start, layer, tuple(n_self), init))
        layer = max(layer, start + 1)
    return tuple(found)


def scanned_layers(cfg: ModelConfig) -> int:
    """How many of `cfg`'s layers the scans cover, run-wise and diagonal (the others are
    unrolled)."""
    return sum(r.stop - r.start for r in scan_runs(cfg) + diagonal_runs(cfg))


def uses_scan(setting: str, cached: bool, n_tokens: int, platform: str) -> bool:
    """Whether a call scans its runs: `off` never; `on` always; `auto` on TPUs and GPUs (where a
    deep model's compile time is what scanning buys), except a cached call of one token (a decode
    step updates every layer's cache in place, which a scan would stack and copy), and never on a
    CPU, where the unrolled step runs faster (docs/bench.md, "Compile time")."""
    if setting != "auto":
        return setting == "on"
    return platform != "cpu" and not (cached and n_tokens == 1)


def uses_diagonal(setting: str, cached: bool, platform: str) -> bool:
    """Whether a call also scans the diagonal loops (never with a cache): `on` always; `auto` on
    TPUs only, where they shorten a compile of minutes, and not on GPUs, whose compile is not
    the limit: their padded K/V heads cost FLOPs (docs/model.md)."""
    if cached or setting == "off":
        return False
    return setting == "on" or platform == "tpu"


def _view(cfg: ModelConfig, layer: int, plan: LayerPlan) -> ModelConfig:
    """`cfg` whose layer `layer` has `plan` (the relative plan a scanned Block reads)."""
    view = copy.copy(cfg)
    layers = list(cfg.layers)
    layers[layer] = plan
    view.__dict__["layers"] = tuple(layers)  # the cached_property's slot: the fields are frozen
    return view


def _last_heads(x, n_kv: int, n: int, axis: int):
    """Heads n_kv - n .. n_kv - 1 of x (zeros in front where x exports fewer than n: no layer
    reads them)."""
    if n <= n_kv:
        return jax.lax.slice_in_dim(x, n_kv - n, n_kv, axis=axis)
    part = jax.lax.slice_in_dim(x, 0, n_kv, axis=axis)
    shape = list(x.shape)
    shape[axis] = n - n_kv
    return jnp.concatenate([jnp.zeros(shape, x.dtype), part], axis=axis)


def _stack(trees):
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)


class _Dropouts:
    """An interceptor of a functional Block apply's dropout calls: with `keys` None it records
    which calls draw a key (module path and call count, in call order); with `keys` [calls, ...]
    it hands the i-th call keys[i]. The key of the n-th call of `h_<layer>`'s module at path P is
    the one flax derives in the unrolled decoder: suffix (h_<layer>,) + P + (n,) of the decoder's
    dropout stream."""

    def __init__(self, keys=None):
        self.keys, self.calls, self.order = keys, {}, []

    def __call__(self, next_fun, args, kwargs, context):
        if not (isinstance(context.module, nn.Dropout) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        path = tuple(context.module.scope.path)
        self.calls[path] = self.calls.get(path, 0) + 1
        self.order.append(path + (self.calls[path],))
        if self.keys is not None:
            kwargs = {**kwargs, "rng": self.keys[len(self.order) - 1]}
        return next_fun(*args, **kwargs)


def _apply(block: Block, p, args: tuple, keys):
    """`block.apply` of params `p` on `args`, its dropout calls handed `keys` [calls] (None: no
    dropout; a `_Dropouts` without keys: record the calls)."""
    call = functools.partial(block.apply, {"params": p}, *args)
    if keys is None:
        return call()
    if isinstance(keys, _Dropouts):  # recording: any key will do
        with nn.intercept_methods(keys):
            return call(rngs={"dropout": jax.random.PRNGKey(0)})
    with nn.intercept_methods(_Dropouts(keys)):
        return call()


def _layer_keys(dropout_stream: LazyRng, layers, order):
    """[layers, calls] dropout keys: those flax derives for each of `layers`' recorded calls."""
    return jnp.stack([jnp.stack([LazyRng.create(dropout_stream, f"h_{layer}", *call).as_jax_rng()
                                 for call in order]) for layer in layers])


def _initial_window(cfg: ModelConfig, run: Run, earlier: list, like, axis: int, dtype) -> list:
    """The carry's first window, oldest entry first: the last C_e exported heads of the layer e
    back from the run (zeros shaped like `like` where no layer reads the entry)."""
    out = []
    for e in range(len(run.window), 0, -1):
        layer, n = run.start - e, run.window[e - 1]
        if layer < 0 or not n or earlier[layer] is None:
            shape = list(like.shape)
            shape[axis] = n
            out.append((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)))
        else:
            n_kv = cfg.layers[layer].n_kv
            out.append(tuple(_last_heads(t.astype(dtype), n_kv, n, axis) for t in earlier[layer]))
    return out


def run_scan(run: Run, cfg: ModelConfig, kernels, params: dict, x, earlier: list,
             positions_BT, cache, cache_index, key_mask_BS, deterministic: bool, v_first,
             segment_ids_BT, policy, dropout_stream: Optional[LazyRng], needed):
    """Apply `run`'s layers to the residual stream `x`. `earlier[l]`: layer l's K/V (its cache
    with `cache`) for the layers before the run (None where nothing reads it); `params`: the
    decoder's (unboxed); `policy`: a jax.checkpoint policy or "none"; `needed`: the layers whose
    K/V something after the run reads. Returns the new `x` and, per layer of the run, its K/V
    (its new cache), None where neither `needed` nor the cache asks for it."""
    cached = cache is not None
    axis = CACHE_HEAD_AXIS if cached else HEAD_AXIS
    width, P, R = len(run.window), run.period, run.repeats
    kv_dtype = cache[run.start][0].dtype if cached else cfg.compute_dtype
    blocks = [Block(_view(cfg, run.start + j, run.plans[j]), run.start + j, kernels, parent=None)
              for j in range(P)]
    draws = not deterministic and cfg.dropout > 0 and dropout_stream is not None

    def raw(j, p, h, window_kv, cache_l, keys):
        return _apply(blocks[j], p, (h, window_kv, positions_BT, cache_l, cache_index, key_mask_BS,
                                     deterministic, v_first, segment_ids_BT), keys)

    def layer_fn(j):
        fn = functools.partial(raw, j)
        if policy != "none":
            fn = jax.checkpoint(fn, policy=policy, prevent_cse=False)
        return fn
    fns = [layer_fn(j) for j in range(P)]

    def period(h, window, xs_, call):
        own = []
        for j in range(P):
            p, cache_l, keys = xs_[j]
            h, kv, _ = call(j)(p, h, tuple(window) + tuple(own), cache_l, keys)
            own.append(kv)
        return h, own

    params_at = [jax.tree_util.tree_map(lambda *a: jnp.stack(a),
                                        *[params[f"h_{layer}"] for layer in run.layers(j)])
                 for j in range(P)]
    caches_at = [_stack([cache[layer] for layer in run.layers(j)]) if cached else None
                 for j in range(P)]
    like = cache[run.start][0] if cached else jnp.zeros(x.shape[:2] + (0, cfg.head_dim))
    init = _initial_window(cfg, run, earlier, like, axis, kv_dtype)

    keys_at = [None] * P
    if draws:  # which dropout calls each phase makes (one abstract trace), then every key
        recorders = [_Dropouts() for _ in range(P)]
        first = [(jax.tree_util.tree_map(lambda a: a[0], params_at[j]),
                  None if caches_at[j] is None else jax.tree_util.tree_map(lambda a: a[0],
                                                                           caches_at[j]),
                  recorders[j]) for j in range(P)]
        jax.eval_shape(lambda h, w: period(h, w, first, lambda j: functools.partial(raw, j))[0],
                       x, init)
        keys_at = [_layer_keys(dropout_stream, run.layers(j), recorders[j].order)
                   for j in range(P)]

    out_phase = [cached or any(layer in needed for layer in run.layers(j)) for j in range(P)]

    def body(carry, xs_):
        h, window = carry
        h, own = period(h, window, xs_, lambda j: fns[j])
        new = []  # entry e of the next period, oldest (e = width) first
        for e in range(width, 0, -1):
            if e <= P:
                src, n_kv = own[P - e], run.plans[P - e].n_kv
            else:
                src, n_kv = window[width - (e - P)], run.window[e - P - 1]
            new.append(tuple(_last_heads(t, n_kv, run.window[e - 1], axis) for t in src))
        return (h, new), tuple(own[j] if out_phase[j] else None for j in range(P))

    xs = tuple(zip(params_at, caches_at, keys_at))
    (x, _), ys = jax.lax.scan(body, (x, init), xs, length=R)
    out = {}
    for j in range(P):
        for i, layer in enumerate(run.layers(j)):
            out[layer] = (jax.tree_util.tree_map(lambda a, i=i: a[i], ys[j]) if out_phase[j]
                          else None)
    return x, [out[layer] for layer in range(run.start, run.stop)]


def _pad_heads(tree, n_head: int):
    """A layer's params with its K/V projections' kernels and biases padded with zero heads to
    `n_head` (the heads axis is the one before head_dim)."""
    def pad(x):
        widths = [(0, 0)] * x.ndim
        widths[-2] = (0, n_head - x.shape[-2])
        return jnp.pad(x, widths)
    attn = dict(tree["attn"])
    for name in ("k", "v"):
        attn[name] = jax.tree_util.tree_map(pad, tree["attn"][name])
    return {**tree, "attn": attn}


def run_diagonal(run: Diagonal, cfg: ModelConfig, kernels, params: dict, x, earlier: list,
                 positions_BT, key_mask_BS, deterministic: bool, segment_ids_BT, policy,
                 dropout_stream: Optional[LazyRng], needed):
    """Apply the diagonal `run`'s layers to `x` (no cache); the arguments are `run_scan`'s.
    Returns the new `x` and, per layer of the run, its own K/V (n_self heads), None where no
    layer after the run reads it."""
    H, dt = cfg.n_head, cfg.compute_dtype
    layers = list(range(run.start, run.stop))
    block = Block(_view(cfg, run.start, LayerPlan(run.start, H, ())), run.start, kernels,
                  parent=None)
    draws = not deterministic and cfg.dropout > 0 and dropout_stream is not None

    def raw(p, h, carry_kv, keys):
        return _apply(block, p, (h, (), positions_BT, None, None, key_mask_BS, deterministic,
                                 None, segment_ids_BT, carry_kv), keys)

    fn = raw if policy == "none" else jax.checkpoint(raw, policy=policy, prevent_cse=False)
    stacked = _stack([_pad_heads(params[f"h_{layer}"], H) for layer in layers])
    keep = jnp.asarray([[h < n for h in range(H)] for n in run.n_self])
    zeros = jnp.zeros(x.shape[:2] + (1, cfg.head_dim), dt)
    init = tuple(
        jnp.concatenate([zeros if src is None else
                         jax.lax.slice_in_dim(earlier[src[0]][i], src[1], src[1] + 1,
                                              axis=HEAD_AXIS).astype(dt)
                         for src in run.init], axis=HEAD_AXIS)
        for i in (0, 1))
    keys = None
    if draws:  # which dropout calls a layer makes (one abstract trace), then every layer's keys
        recorder = _Dropouts()
        jax.eval_shape(lambda p, h, c: raw(p, h, (keep[0], *c), recorder)[0],
                       jax.tree_util.tree_map(lambda a: a[0], stacked), x, init)
        keys = _layer_keys(dropout_stream, layers, recorder.order)
    out = any(layer in needed for layer in layers)

    def body(carry, xs_):
        h, kv = carry
        p, keep_H, keys_ = xs_
        h, own, _ = fn(p, h, (keep_H, *kv), keys_)
        return (h, own), own if out else None

    (x, _), ys = jax.lax.scan(body, (x, init), (stacked, keep, keys))
    kvs = [None] * len(layers)
    for i, layer in enumerate(layers):
        if out and layer in needed:
            kvs[i] = tuple(jax.lax.slice_in_dim(t[i], 0, run.n_self[i], axis=HEAD_AXIS)
                           for t in ys)
    return x, kvs
