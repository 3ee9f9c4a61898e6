"""The learned route of `model.head_plan='route'`: one logit per (cross head, candidate source layer),
softmax over the sources (docs/attention.md#head-plans).

A routed layer's parameter `route_logits` [n_cross, n_sources] starts at ROUTE_INIT_LOGIT for the
source that `all` gives the head and 0 for the others, so training starts near `all`: with 5
candidates the starting choice weighs e^3 / (e^3 + 4) = 0.83.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .schedule import LayerPlan

ROUTE_INIT_LOGIT = 3.0


def route_sources(plan: LayerPlan) -> tuple[tuple[int, int], ...]:
    """The (layer, K/V head) candidates a routed layer mixes (the same for all its cross heads)."""
    return plan.cross[0].mixture


def route_init_logits(plan: LayerPlan) -> np.ndarray:
    """[n_cross, n_sources]: ROUTE_INIT_LOGIT at each head's starting source, 0 elsewhere."""
    sources = [layer for layer, _ in route_sources(plan)]
    logits = np.zeros((plan.n_cross, len(sources)), np.float32)
    row = 0
    for g in plan.cross:
        logits[row:row + g.n_heads, sources.index(g.source)] = ROUTE_INIT_LOGIT
        row += g.n_heads
    return logits


def softmax_weights(logits) -> jax.Array:
    """Route weights from logits, in float32: every row sums to 1."""
    return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def route_weights(cfg, params) -> dict[int, np.ndarray]:
    """{layer: [n_cross, n_sources] weights} of every routed layer; column j is the layer
    `route_sources(cfg.layers[layer])[j][0]`."""
    return {p.layer: np.asarray(softmax_weights(params[f"h_{p.layer}"]["attn"]["route_logits"]))
            for p in cfg.layers if p.routed}


def route_metrics(cfg, params) -> dict[str, float]:
    """Flat scalars for a metrics log: `route/L3h1<-L0` is the weight that layer 3's cross head 1
    gives layer 0 (empty for a plan without routes)."""
    out = {}
    for layer, weights in route_weights(cfg, params).items():
        sources = [src for src, _ in route_sources(cfg.layers[layer])]
        for head, row in enumerate(weights):
            for src, w in zip(sources, row):
                out[f"route/L{layer}h{head}<-L{src}"] = float(w)
    return out
