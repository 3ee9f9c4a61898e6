"""Configuration of an exported Reflex Attention decoder (`model_type` "reflex_jax").

This file is copied next to the weights by reflex_jax's HF export and loaded with
`trust_remote_code=True`; it imports only transformers.

`reflex_model` holds every field of the training side's ModelConfig as it was exported, and
`layer_plan` the resolved head split of every layer: its number of self heads and, per cross
group, the source layer and the source layer's K/V heads the group reads, in head order. The
modeling file reads the plan as it is and never re-derives a schedule. The HF-style fields
(`hidden_size`, `num_hidden_layers`, ...) repeat the sizes for tools that look for them.
"""
from transformers import PreTrainedConfig


class ReflexJaxConfig(PreTrainedConfig):
    model_type = "reflex_jax"

    vocab_size: int = 259
    hidden_size: int = 64
    num_hidden_layers: int = 1
    num_attention_heads: int = 1
    max_position_embeddings: int = 64
    intermediate_size: int = 256
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    reflex_model: dict | None = None   # the exported ModelConfig.to_dict()
    # [{"layer", "n_self", "cross": [{"source", "n_heads", "source_heads"}, ...]}, ...]
    layer_plan: list | None = None


__all__ = ["ReflexJaxConfig"]
