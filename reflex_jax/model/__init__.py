"""The Reflex decoder. Read in this order: config.py, schedule.py and plans.py (what a model is and
how its heads are split), kv.py (which K/V each head reads), route.py, layers.py, decoder.py."""
from .config import ModelConfig
from .decoder import (Decoder, abstract_params, count_params, head_matrix, init_params,
                      logits_from_hidden, param_logical_axes)
from .kv import KV, Cache, init_cache, kv_bytes_per_token, kv_cache_bytes
from .route import route_metrics, route_weights
from .schedule import CrossGroup, LayerPlan

__all__ = ["Cache", "CrossGroup", "Decoder", "KV", "LayerPlan", "ModelConfig", "abstract_params",
           "count_params", "head_matrix", "init_cache", "init_params", "kv_bytes_per_token",
           "kv_cache_bytes", "logits_from_hidden", "param_logical_axes", "route_metrics",
           "route_weights"]
