"""reflex_jax: Reflex Attention decoders in JAX/Flax.

The names below load on first use, so that `reflex_jax.malloc_tuning` can restart a CLI before
JAX is imported."""
import importlib

_EXPORTS = {"ReflexError": "errors", "ConfigError": "errors", "CrossGroup": "model",
            "LayerPlan": "model", "ModelConfig": "model", "Decoder": "model",
            "count_params": "model", "init_cache": "model", "init_params": "model",
            "abstract_params": "model", "param_logical_axes": "model",
            "load_params": "checkpoint", "save_params": "checkpoint"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'reflex_jax' has no attribute {name!r}")
