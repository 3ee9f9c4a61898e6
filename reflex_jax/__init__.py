"""reflex_jax: Reflex Attention decoders in JAX/Flax."""
from .config import ConfigError, CrossGroup, LayerPlan, ModelConfig
from .model import Decoder, count_params, init_cache, init_params, param_logical_axes
from .checkpoint import load_params, save_params

__all__ = ["ConfigError", "CrossGroup", "LayerPlan", "ModelConfig", "Decoder", "count_params",
           "init_cache", "init_params", "param_logical_axes", "load_params", "save_params"]
