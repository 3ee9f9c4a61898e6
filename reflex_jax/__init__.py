"""reflex_jax: Reflex Attention decoders in JAX/Flax."""
from .config import ConfigError, CrossGroup, LayerPlan, ModelConfig
from .model import Decoder, count_params, init_cache, init_params, param_logical_axes

__all__ = ["ConfigError", "CrossGroup", "LayerPlan", "ModelConfig", "Decoder", "count_params",
           "init_cache", "init_params", "param_logical_axes"]
